"""torch.ops.multiverse.*: fake implementations, opcheck, torch.compile(fullgraph=True)."""

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.planning import plan_tree_attention
from multiverse_kernels.testing import make_inputs, multiverse_forest


def _example():
    f, groups = multiverse_forest(prefix=12, paths=3, path_len=5, concl_len=2, page_size=4, concl_q=2)
    m = f.metadata(groups)
    q, k, v = make_inputs(m, f.num_pages)
    return m, q, k, v


def test_ops_are_registered():
    for name in ("tree_attention", "merge_states", "append_paged_kv"):
        assert hasattr(torch.ops.multiverse, name)


def test_opcheck_tree_attention():
    m, q, k, v = _example()
    args = (q, k, v, *m.tensors(), None, 0.125, "reference", True)
    torch.library.opcheck(torch.ops.multiverse.tree_attention.default, args)
    full = torch.ones(m.num_groups, dtype=torch.bool)
    torch.library.opcheck(torch.ops.multiverse.tree_attention.default,
                          (q, k, v, *m.tensors(), full, 0.125, "reference", True))


def test_opcheck_merge_states():
    v = torch.randn(5, 3, 4, 16)
    s = torch.randn(5, 3, 4)
    torch.library.opcheck(torch.ops.multiverse.merge_states.default, (v, s, "reference", True))


def test_opcheck_append_paged_kv():
    f = mk.KVForest(8, 4)
    n = f.new_sequence(2)
    node, pos = f.append(n, 5)
    kc = torch.zeros(8, 4, 2, 16)
    vc = torch.zeros(8, 4, 2, 16)
    k = torch.randn(5, 2, 16)
    torch.library.opcheck(torch.ops.multiverse.append_paged_kv.default,
                          (k, k, kc, vc, *f.page_table(), node, pos, "reference", True))


def test_compile_fullgraph():
    m, q, k, v = _example()
    kk = torch.randn(2, *k.shape[2:])

    def step(q, k_cache, v_cache, new_k, node, pos):
        mk.append_paged_kv(new_k, new_k, k_cache, v_cache, m.node_page_indptr, m.node_page_indices,
                           node, pos, validate=False)
        out, lse = mk.tree_attention(q * 2, k_cache, v_cache, m, return_lse=True)
        o2, l2 = mk.merge_states(torch.stack([out, out], 1), torch.stack([lse, lse], 1))
        return o2 + 1, l2

    node = torch.tensor([0, 0], dtype=torch.int32)
    pos = torch.tensor([0, 1], dtype=torch.int32)
    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    eager = step(q, k1, v1, kk, node, pos)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k2, v2, kk, node, pos)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    torch.testing.assert_close(k2, k1)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # (the trace at the end)
def test_eager_inference_calls_the_ops_function_directly(monkeypatch):
    """tree_attention skips torch's dispatcher only where it would add nothing (ops/_dispatch.py,
    direct_call_ok): plain eager calls with no gradient wanted run the op's function directly, with the
    same result; a gradient, a dispatch mode or the profiler send the call through the op."""
    import importlib

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    mod = importlib.import_module("multiverse_kernels.ops.tree_attention")
    m, q, k, v = _example()
    want = mk.tree_attention(q, k, v, m, backend="cpu")
    calls = []
    real_op = mod._tree_attention_op
    monkeypatch.setattr(mod, "_tree_attention_op", lambda *a: calls.append(1) or real_op(*a))
    for plan in (None, plan_tree_attention(m, q.shape[1], k.shape[2], head_dim=q.shape[2])):
        got = mk.tree_attention(q, k, v, m, backend="cpu", plan=plan, validate=False)
        assert torch.equal(got, want) and not calls
    got = mk.tree_attention(q, k, v, m, backend="cpu", softcap=30.0, sinks=torch.zeros(q.shape[1]))
    assert not calls
    with torch.no_grad():
        mk.tree_attention(q, k, v, m, backend="cpu", validate=False)
    assert not calls
    qg = q.clone().requires_grad_()
    assert torch.equal(mk.tree_attention(qg, k, v, m, backend="cpu"), want) and len(calls) == 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mk.tree_attention(q, k, v, m, backend="cpu")
    assert len(calls) == 2 and any("multiverse::tree_attention" in e.name for e in prof.events())
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fm = mk.ForestMetadata(*(mode.from_tensor(t) for t in m.tensors()), m.page_size)
        out = mk.tree_attention(fq, fk, fv, fm, backend="cpu", validate=False)
    assert len(calls) == 3 and out.shape == q.shape
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        got = mk.tree_attention(q, k, v, m, backend="cpu", validate=False)
    assert len(calls) == 4 and "multiverse.tree_attention.default" in seen and torch.equal(got, want)
    with torch.device("cpu"):  # a torch-function mode
        mk.tree_attention(q, k, v, m, backend="cpu", validate=False)
    assert len(calls) == 5
    traced = torch.jit.trace(lambda q: mk.tree_attention(q, k, v, m, backend="cpu", validate=False), (q,),
                             check_trace=False)
    assert len(calls) == 6 and "multiverse::tree_attention" in str(traced.graph)
    mq, mk_, mv = (t.to("meta") for t in (q, k, v))  # meta tensors: the op's fake implementation
    mm = mk.ForestMetadata(*(t.to("meta") for t in m.tensors()), m.page_size)
    out = mk.tree_attention(mq, mk_, mv, mm, backend="cpu", validate=False)
    assert len(calls) == 7 and out.is_meta and out.shape == q.shape
