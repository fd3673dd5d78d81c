"""Autograd of tree_attention (docs/design.md §3, packed tree attention with autograd): gradcheck in float64,
gradients equal autograd through the dense-mask SDPA, the blocked backward at tiny block sizes, the
packed-training case on parsed Multiverse sequences, opcheck of the backward op, torch.compile."""

import random

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.backends import available_backends
from multiverse_kernels.backends.reference.tree_attention_backward import tree_attention_backward as ref_bw
from multiverse_kernels.multiverse import MultiverseTags, parse
from multiverse_kernels.multiverse.synthetic import random_sequence
from multiverse_kernels.ops import tree_attention_backward
from multiverse_kernels.testing import multiverse_forest, random_forest, tolerance

V = 32
TAGS = MultiverseTags(*range(V, V + 10))


def compact(meta: mk.ForestMetadata, extra: int = 2, seed: int = 0) -> tuple[mk.ForestMetadata, int]:
    """The same forest over a small pool: used pages renumbered in a random order, plus ``extra`` unused
    pages (their gradients must stay 0). Returns (meta, num_pages). Keeps gradcheck small."""
    used = torch.unique(meta.node_page_indices.long())
    n = used.numel() + extra
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:used.numel()]
    remap = torch.full((int(used.max()) + 1 if used.numel() else 1,), -1, dtype=torch.long)
    remap[used] = perm
    pages = remap[meta.node_page_indices.long()].to(torch.int32)
    return mk.ForestMetadata(meta.node_page_indptr, pages, meta.node_len, meta.qo_indptr, meta.vis_indptr,
                             meta.vis_nodes, meta.page_size, meta.own_full), max(n, 1)


def forest_case(seed: int, page_size: int, hq: int = 4, hk: int = 2, d: int = 4, own_full: bool = False,
                dtype=torch.float64, **kw):
    f, groups = random_forest(seed, page_size=page_size, **kw)
    m, num_pages = compact(f.metadata(groups), seed=seed)
    if own_full:
        m = m.with_own_full(torch.rand(m.num_groups, generator=torch.Generator().manual_seed(seed)) < 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(m.total_q, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(num_pages, page_size, hk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(num_pages, page_size, hk, d, generator=g, dtype=torch.float64).to(dtype)
    return m, q, k, v


def dense_out_lse(q, k, v, m, sm_scale=None):
    """Differentiable dense-mask attention in q's dtype: out via SDPA (mk.dense_attention) and lse via a
    masked logsumexp over the L x L scores."""
    sm = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    mask = mk.dense_mask(m)
    out = mk.dense_attention(q, k, v, m, sm_scale=sm, mask=mask)
    slots = mk.key_slots(m)
    hq, hk = q.shape[1], k.shape[2]
    kk = k.reshape(-1, hk, k.shape[-1])[slots].repeat_interleave(hq // hk, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * sm
    lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1).T
    return out, lse


def seen_slots(m: mk.ForestMetadata, num_slots: int) -> torch.Tensor:
    """bool [num_slots]: cache slots of nodes listed by a group with rows."""
    seen = torch.zeros(num_slots, dtype=torch.bool)
    qo, vi, vis = m.qo_indptr.tolist(), m.vis_indptr.tolist(), m.vis_nodes.tolist()
    for g in range(m.num_groups):
        if qo[g + 1] > qo[g]:
            for n in vis[vi[g]:vi[g + 1]]:
                seen[m.node_token_slots(n)] = True
    return seen


CASES = [(seed, ps, hq, hk, full) for seed, ps, hq, hk, full in
         [(0, 1, 4, 2, False), (1, 4, 4, 2, False), (2, 4, 2, 2, True), (3, 1, 4, 1, True),
          (4, 4, 3, 1, False), (5, 1, 2, 2, False)]]


def test_cases_cover_the_shapes():
    """The gradcheck forests hold empty and one-token nodes, joins, extend groups (q_len > 1) and
    groups with no rows."""
    empty = one = joins = extend = idle = 0
    for seed, ps, *_ in CASES:
        f, groups = random_forest(seed, page_size=ps, max_q_len=5)
        lens = [f.node_len(n) for n in range(f.num_nodes)]
        empty += lens.count(0)
        one += lens.count(1)
        extend += sum(q > 1 for _, q in groups)
        idle += sum(q == 0 for _, q in groups)
        for n in range(f.num_nodes):  # a join sees two siblings (same visibility before them)
            before = [tuple(f.visibility(a)[:-1]) for a in f.visibility(n)]
            joins += len(before) != len(set(before))
    assert empty and one and joins and extend and idle, (empty, one, joins, extend, idle)


@pytest.mark.parametrize("seed,page_size,hq,hk,own_full", CASES)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_gradcheck(seed, page_size, hq, hk, own_full, backend):
    m, q, k, v = forest_case(seed, page_size, hq, hk, own_full=own_full, max_q_len=5)
    for t in (q, k, v):
        t.requires_grad_()
    fn = lambda q, k, v: mk.tree_attention(q, k, v, m, backend=backend)  # noqa: E731
    # fast_mode: a random projection of the Jacobian (catches a wrong entry with probability 1); the
    # full Jacobian for two cases on the reference backend
    full_jacobian = backend == "reference" and seed in (0, 3)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=not full_jacobian)


@pytest.mark.parametrize("seed,page_size,hq,hk,own_full", CASES)
def test_grads_equal_dense_autograd(seed, page_size, hq, hk, own_full):
    """Both outputs (out and lse) carry gradients; compared with autograd through dense-mask SDPA."""
    m, q, k, v = forest_case(seed, page_size, hq, hk, d=8, own_full=own_full, max_q_len=6)
    for t in (q, k, v):
        t.requires_grad_()
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(q.shape, generator=g, dtype=torch.float64)
    # lse is float32: its gradient reaches the op rounded to float32, so use float32-exact values
    gl = torch.randn(q.shape[:2], generator=g).double()
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True, backend="reference")
    want_out, want_lse = dense_out_lse(q, k, v, m)
    got = torch.autograd.grad((out * go).sum() + (lse.double() * gl).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * go).sum() + (want_lse * gl).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"d{name}")
    seen = seen_slots(m, k.shape[0] * k.shape[1])
    for name, t in (("k", got[1]), ("v", got[2])):
        flat = t.reshape(-1, *t.shape[2:])
        assert bool((flat[~seen] == 0).all()), f"d{name}: nonzero gradient on a slot no row sees"
        assert bool(flat[seen].abs().sum(-1).sum(-1).gt(0).all()), f"d{name}: a seen slot got no gradient"


def test_cpu_forward_float32_grads():
    """backend="cpu" (the C++ forward) + the reference backward in float32 vs float64 dense autograd."""
    if "cpu" not in available_backends("tree_attention", "cpu"):
        pytest.skip("the C++ cpu backend is not built")
    for seed, ps in ((6, 1), (7, 4), (8, 16)):
        m, q, k, v = forest_case(seed, ps, 8, 2, d=64, dtype=torch.float32, max_q_len=8, max_len=40)
        g = torch.Generator().manual_seed(seed)
        go = torch.randn(q.shape, generator=g)
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = mk.tree_attention(*ins, m, backend="cpu")
        got = torch.autograd.grad((out * go).sum(), ins)
        ins64 = [t.double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad((dense_out_lse(*ins64, m)[0] * go.double()).sum(), ins64)
        for name, a, b in zip("qkv", got, want):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-4, msg=f"d{name} seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_low_precision_and_head_dims(dtype, d):
    """fp16/bf16/fp32 inputs (float32 accumulation, gradients in the input dtype) at head dims
    64/128/256 against float64 dense autograd, with a plan passed to the forward (it gets no grad)."""
    from multiverse_kernels.planning import plan_tree_attention

    m, q, k, v = forest_case(12 + d, 16, 4, 2, d=d, dtype=dtype, max_q_len=6, max_len=40)
    g = torch.Generator().manual_seed(d)
    go = torch.randn(q.shape, generator=g).to(dtype)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    plan = plan_tree_attention(m, 4, 2, head_dim=d)
    got = torch.autograd.grad((mk.tree_attention(*ins, m, plan=plan) * go).sum(), ins)
    ins64 = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad((dense_out_lse(*ins64, m)[0] * go.double()).sum(), ins64)
    for name, a, b in zip("qkv", got, want):  # the forward's tolerances (measured errors: < 1/4 of them)
        assert a.dtype == dtype and a.shape == b.shape
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a.double(), b, **tolerance(dtype), msg=f"d{name}")


@pytest.mark.parametrize("block_q,block_k", [(1, 1), (2, 3), (5, 2)])
def test_blocking_is_exact(block_q, block_k):
    """The blocked backward at tiny blocks (many row and key blocks per node, causal blocks skipped)
    gives the one-block result, with a lse gradient, GQA and own_full groups."""
    for seed in (9, 10):
        m, q, k, v = forest_case(seed, 4, 4, 2, d=8, own_full=True, max_q_len=7)
        out, lse = mk.tree_attention(q, k, v, m, return_lse=True, backend="reference")
        g = torch.Generator().manual_seed(seed)
        go = torch.randn(q.shape, generator=g, dtype=torch.float64)
        gl = torch.randn(lse.shape, generator=g)
        big = ref_bw(go, gl, q, k, v, out, lse, m, 0.3, block_q=1 << 20, block_k=1 << 20)
        small = ref_bw(go, gl, q, k, v, out, lse, m, 0.3, block_q=block_q, block_k=block_k)
        for a, b in zip(small, big):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_that_see_nothing_contribute_nothing(dtype):
    """lse = -inf rows (out 0; valid metadata cannot make one, the guard is for callers of the op):
    no NaN/inf, their dq is 0, and the other rows' gradients are those of the forest without them."""
    m, q, k, v = forest_case(1, 4, 4, 2, d=8, max_q_len=5, dtype=dtype)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    dead = torch.zeros(q.shape[0], dtype=torch.bool)
    dead[0] = True
    out2 = out.masked_fill(dead[:, None, None], 0)
    lse2 = lse.masked_fill(dead[:, None], float("-inf"))
    dq, dk, dv = ref_bw(go, gl, q, k, v, out2, lse2, m, 8 ** -0.5)
    for t in (dq, dk, dv):
        assert bool(torch.isfinite(t).all())
    assert bool((dq[0] == 0).all())
    go0, gl0 = go.masked_fill(dead[:, None, None], 0), gl.masked_fill(dead[:, None], 0)
    want = ref_bw(go0, gl0, q, k, v, out, lse, m, 8 ** -0.5)
    for a, b in zip((dq[1:], dk, dv), (want[0][1:], want[1], want[2])):
        torch.testing.assert_close(a, b, **tolerance(dtype))


def test_backward_memory_is_bounded_by_blocks():
    """Every tensor the backward creates is at most a [Hq, block_q, block_k] score block or the size of
    q / the caches (inputs and gradient accumulators): never q_len x a node's keys (unblocked, the
    300-row conclusion x the 600-token trunk x 4 heads makes a 720K-element score tensor, 11x the
    largest allowed here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            for t in res if isinstance(res, (tuple, list)) else (res,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return res

    f, groups = multiverse_forest(prefix=600, paths=2, path_len=40, concl_len=300, page_size=16,
                                  concl_q=300)
    m = f.metadata(groups)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(m.total_q, 4, 32, generator=g)
    k = torch.randn(f.num_pages, 16, 2, 32, generator=g)
    v = torch.randn(f.num_pages, 16, 2, 32, generator=g)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True)
    go = torch.randn_like(out)
    for bq, bk in ((16, 32), (64, 256)):
        with Largest() as mode:
            got = ref_bw(go, None, q, k, v, out, lse, m, 0.2, block_q=bq, block_k=bk)
        bound = max(4 * bq * bk, q.numel(), k.numel())
        assert mode.numel <= bound < 300 * 4 * 600, (mode.numel, bound)
    want = ref_bw(go, None, q, k, v, out, lse, m, 0.2, block_q=1 << 20, block_k=1 << 20)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_long_node_default_blocks():
    """A 600-token trunk with 300 extend rows and GQA: several row and key blocks at the default block
    sizes (causal key blocks skipped), float32 against float64 dense autograd."""
    f, groups = multiverse_forest(prefix=600, paths=2, path_len=40, concl_len=300, page_size=16,
                                  concl_q=300)
    m = f.metadata(groups)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(m.total_q, 4, 32, generator=g)
    k = torch.randn(f.num_pages, 16, 2, 32, generator=g)
    v = torch.randn(f.num_pages, 16, 2, 32, generator=g)
    go = torch.randn(q.shape, generator=g)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad((mk.tree_attention(*ins, m, backend="reference") * go).sum(), ins)
    ins64 = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad((dense_out_lse(*ins64, m)[0] * go.double()).sum(), ins64)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_training_multiverse(seed):
    """Packed training: every node its own group, q_len = node_len, contiguous K/V as a page-size-1
    cache; gradients of MultiverseStructure.attention equal autograd through SDPA with the Multiverse
    dense mask (built from the blocks, not from the forest)."""
    s = parse(random_sequence(seed, TAGS, vocab=V, max_depth=2, max_paths=3, max_text=6), TAGS)
    L = s.num_tokens
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(L, h, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (4, 2, 2))
    go = torch.randn(L, 4, 8, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((s.attention(q, k, v, backend="reference") * go).sum(), (q, k, v))
    got_auto = torch.autograd.grad((s.attention(q, k, v) * go).sum(), (q, k, v))
    mask = s.dense_mask()
    want_out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    ).transpose(0, 1)
    want = torch.autograd.grad((want_out * go).sum(), (q, k, v))
    for name, a, a2, b in zip("qkv", got, got_auto, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"d{name}")
        torch.testing.assert_close(a2, b, atol=1e-10, rtol=1e-10, msg=f"d{name} (auto)")
    # gradcheck the packed case itself on a short prefix of the structure's inputs
    if seed == 0:
        small = [t.detach()[:, :h, :4].clone().requires_grad_() for t, h in ((q, 2), (k, 1), (v, 1))]
        assert torch.autograd.gradcheck(lambda a, b, c: s.attention(a, b, c, backend="reference"),
                                        small, fast_mode=True)


def test_opcheck_backward():
    f, groups = multiverse_forest(prefix=12, paths=3, path_len=5, concl_len=2, page_size=4, concl_q=2)
    m = f.metadata(groups)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(m.total_q, 4, 16, generator=g)
    k = torch.randn(f.num_pages, 4, 2, 16, generator=g)
    v = torch.randn(f.num_pages, 4, 2, 16, generator=g)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    op = torch.ops.multiverse.tree_attention_backward.default
    for grad_lse, full in ((gl, None), (None, torch.ones(m.num_groups, dtype=torch.bool))):
        out2, lse2 = mk.tree_attention(q, k, v, m.with_own_full(full), return_lse=True)
        torch.library.opcheck(op, (go, grad_lse, q, k, v, out2, lse2, *m.tensors(), full, 0.25,
                                   "reference", True))
    # the forward op's autograd registration, through opcheck's autograd tests
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.multiverse.tree_attention.default,
                          (qr, kr, vr, *m.tensors(), None, 0.25, "reference", True))


def test_public_backward_equals_autograd():
    m, q, k, v = forest_case(11, 4, 4, 2, d=8, max_q_len=5)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True, sm_scale=0.7)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    got = tree_attention_backward(go, q, k, v, out, lse, m, grad_lse=gl, sm_scale=0.7)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    o2, l2 = mk.tree_attention(*ins, m, return_lse=True, sm_scale=0.7)
    want = torch.autograd.grad((o2 * go).sum() + (l2 * gl).sum(), ins)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_backward_errors_name_the_argument():
    m, q, k, v = forest_case(0, 4)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True)
    with pytest.raises(mk.MetadataError, match="grad_out"):
        tree_attention_backward(out[:, :1], q, k, v, out, lse, m)
    with pytest.raises(mk.MetadataError, match="grad_lse"):
        tree_attention_backward(out, q, k, v, out, lse, m,
                                                               grad_lse=lse[:1])
    with pytest.raises(RuntimeError, match="backend"):
        tree_attention_backward(out, q, k, v, out, lse, m, backend="cuda")


def test_not_twice_differentiable():
    m, q, k, v = forest_case(1, 4)
    q.requires_grad_()
    out = mk.tree_attention(q, k, v, m)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dq.sum(), q)


def test_compile_fullgraph_backward():
    """torch.compile(fullgraph=True) of a training step that calls tree_attention and .backward(): one
    AOT graph holding both tree_attention and tree_attention_backward (through their fake impls), with
    the eager gradients. Dynamo needs trace_autograd_ops for .backward() inside a full graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    f, groups = multiverse_forest(prefix=12, paths=3, path_len=5, concl_len=2, page_size=4, concl_q=2)
    m = f.metadata(groups)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(m.total_q, 4, 16, generator=g),
            torch.randn(f.num_pages, 4, 2, 16, generator=g), torch.randn(f.num_pages, 4, 2, 16, generator=g)]

    def step(q, k, v):
        out, lse = mk.tree_attention(q * 2, k, v, m, return_lse=True)
        loss = (out.square().sum() + lse.sum()) * 0.5
        loss.backward()
        return loss.detach(), q.grad * 1, k.grad * 1, v.grad * 1

    eager = step(*[t.clone().requires_grad_() for t in base])
    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        fn = torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
        compiled = fn(*[t.clone().requires_grad_() for t in base])
    assert len(graphs) == 1
    assert "multiverse.tree_attention.default" in graphs[0]
    assert "multiverse.tree_attention_backward.default" in graphs[0]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)

    # the common pattern: a compiled forward with requires_grad inputs, eager .backward()
    def fwd(q, k, v):
        out, lse = mk.tree_attention(q * 2, k, v, m, return_lse=True)
        return (out.square().sum() + lse.sum()) * 0.5

    torch._dynamo.reset()
    ins = [t.clone().requires_grad_() for t in base]
    loss = torch.compile(fwd, fullgraph=True, backend="aot_eager")(*ins)
    loss.backward()
    for a, b in zip([loss.detach()] + [t.grad for t in ins], eager):
        torch.testing.assert_close(a, b)


def test_random_seeds_fuzz():
    """More random forests (page sizes 1/4/16, GQA 1/2/4, own_full mixes) in float64 against dense."""
    rng = random.Random(0)
    for seed in range(20, 32):
        ps, (hq, hk) = rng.choice([1, 4, 16]), rng.choice([(2, 2), (4, 2), (4, 1)])
        m, q, k, v = forest_case(seed, ps, hq, hk, d=4, own_full=rng.random() < 0.5, max_q_len=5)
        for t in (q, k, v):
            t.requires_grad_()
        go = torch.randn(q.shape, dtype=torch.float64)
        got = torch.autograd.grad((mk.tree_attention(q, k, v, m) * go).sum(), (q, k, v))
        want = torch.autograd.grad((dense_out_lse(q, k, v, m)[0] * go).sum(), (q, k, v))
        for name, a, b in zip("qkv", got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"d{name} seed {seed}")
