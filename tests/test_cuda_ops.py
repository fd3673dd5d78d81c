"""CUDA backend (multiverse_kernels._C_cuda) against the reference, on fresh random forests.

Needs a CUDA GPU and the built CUDA extension; elsewhere every test is SKIPPED with the reason (never
reported as passed). Run them all on a GPU machine with ``scripts/run_gpu_tests.sh``. Outputs are
poisoned with NaN inside the extension before every run (MULTIVERSE_DEBUG_POISON=1).
"""

from __future__ import annotations

import pytest
import torch

from multiverse_kernels.ops import append_paged_kv, merge_states, tree_attention
from multiverse_kernels.planning import PlanCapacity, plan_kv_tokens, plan_tree_attention
from multiverse_kernels.testing import (
    make_inputs,
    multiverse_forest,
    random_forest,
    sampling_forest,
    tolerance,
)

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine (CUDA kernel tests run via scripts/run_gpu_tests.sh)",
                allow_module_level=True)
try:
    from multiverse_kernels.backends import cuda as cuda_backend  # noqa: F401
except (ImportError, OSError, RuntimeError) as e:
    pytest.skip(f"CUDA extension not built ({e}); see docs/build.md", allow_module_level=True)

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MULTIVERSE_DEBUG_POISON", "1")


def _check(meta, num_pages, hq, hk, d, dtype, seed, plan=None):
    meta = meta.to(DEV)
    q, k, v = make_inputs(meta, num_pages, hq, hk, d, dtype, device=DEV, seed=seed)
    out, lse = tree_attention(q, k, v, meta, return_lse=True, backend="cuda", plan=plan)
    ref_out, ref_lse = tree_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), meta.to("cpu"),
                                      return_lse=True, backend="reference")
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float().cpu(), ref_out, **tolerance(dtype))
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-3 if dtype != torch.float32 else 1e-4,
                               rtol=2e-3 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128, 256, 80])
def test_random_forests(seed, dtype, d):
    page_size = [1, 16, 4, 32][seed % 4]
    hq, hk = [(4, 4), (8, 2), (8, 1), (32, 8)][seed % 4]
    f, groups = random_forest(4000 + seed, page_size=page_size, max_q_len=[1, 4, 20, 70][seed % 4])
    _check(f.metadata(groups), f.num_pages, hq, hk, d, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("own_full", [False, True])
def test_extend_long_nodes_and_own_full(dtype, own_full):
    f, groups = multiverse_forest(prefix=1500, paths=5, path_len=700, concl_len=40, page_size=16)
    meta = f.metadata([(n, min(q, 40) if q > 1 else q) for n, q in groups]).with_own_full(own_full)
    _check(meta, f.num_pages, 32, 8, 128, dtype, 1)


@pytest.mark.parametrize("chunk,tile", [(1, 1), (7, 3), (64, 100)])
def test_user_plan_and_capacity(chunk, tile):
    f, groups = random_forest(77, page_size=4, max_len=60)
    meta = f.metadata(groups).to(DEV)
    plan = plan_tree_attention(meta, 8, 2, chunk_tokens=chunk, rows_per_tile=tile, head_dim=128)
    cap = PlanCapacity(plan.num_readers + 5, plan.num_items + 7, plan.num_partials + 3,
                       plan.num_merge_rows + 2)
    padded = plan_tree_attention(meta, 8, 2, chunk_tokens=chunk, rows_per_tile=tile, head_dim=128,
                                 capacity=cap)
    for p in (plan, padded):
        _check(meta, f.num_pages, 8, 2, 128, torch.float16, chunk, plan=p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_tree_attention_op_plans_inside(dtype):
    f, groups = random_forest(91, page_size=16, max_q_len=8)
    meta = f.metadata(groups).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, 32, 8, 128, dtype, device=DEV)
    out, lse = torch.ops.multiverse_C.tree_attention(q, k, v, *meta.tensors(), None, 0.1)
    ref_out, ref_lse = tree_attention(q, k, v, meta, sm_scale=0.1, return_lse=True, backend="reference")
    torch.testing.assert_close(out.float(), ref_out.float(), **tolerance(dtype))
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_bytes_hook(dtype):
    from multiverse_kernels.backends import resolve

    hook = resolve("tree_attention_kv_bytes", "cuda", torch.device(DEV))
    f, groups = sampling_forest(prompt=1000, samples=16, gen_len=9)
    meta = f.metadata(groups).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, 32, 8, 128, dtype, device=DEV)
    counted = hook(q, k, v, meta, 0.1)
    if dtype != torch.float32:  # tensor-core kernel: each chunk's K/V loaded once for its <= 64 rows
        assert counted == plan_kv_tokens(meta) * 2 * 8 * 128 * k.element_size()
    else:  # scalar kernel (counted at its loads): every packed row reads the tokens it sees
        from multiverse_kernels.backends.cuda import _plan

        p = _plan(q, k, meta)
        vis = 0
        for w in range(p.num_items):
            kv0, ln = int(p.item_kv_start[w]), int(p.item_kv_len[w])
            r0, nr = int(p.item_reader_start[w]), int(p.item_num_readers[w])
            vis += sum(min(max(int(p.reader_limit[r]) - kv0, 0), ln) for r in range(r0, r0 + nr))
        assert counted == 32 * vis * 2 * 128 * k.element_size()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_states(dtype):
    v = torch.randn(300, 4, 8, 128, device=DEV).to(dtype)
    s = torch.randn(300, 4, 8, device=DEV) * 3
    s[::4, 1] = float("-inf")
    s[7] = float("-inf")
    out, lse = merge_states(v, s, backend="cuda")
    ref_out, ref_lse = merge_states(v.cpu(), s.cpu(), backend="reference")
    torch.testing.assert_close(out.float().cpu(), ref_out.float(), **tolerance(dtype))
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size,d", [(1, 64), (16, 128), (16, 20)])
def test_append_paged_kv(dtype, page_size, d):
    f, groups = random_forest(31, page_size=page_size)
    indptr, indices = (t.to(DEV) for t in f.page_table())
    lens = [f.node_len(n) for n in range(f.num_nodes)]
    token_node = torch.tensor([n for n, ln in enumerate(lens) for _ in range(ln)], dtype=torch.int32,
                              device=DEV)
    token_pos = torch.tensor([j for ln in lens for j in range(ln)], dtype=torch.int32, device=DEV)
    n = token_node.numel()
    k = torch.randn(n, 2, d, device=DEV)
    v = torch.randn(n, 2, d, device=DEV)
    shape = (f.num_pages, page_size, 2, d)
    kc = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    vc = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    kr, vr = kc.cpu(), vc.cpu()
    append_paged_kv(k, v, kc, vc, indptr, indices, token_node, token_pos, backend="cuda")
    append_paged_kv(k.cpu(), v.cpu(), kr, vr, indptr.cpu(), indices.cpu(), token_node.cpu(),
                    token_pos.cpu(), backend="reference")
    torch.testing.assert_close(kc.cpu(), kr, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(vc.cpu(), vr, equal_nan=True, atol=0, rtol=0)


def test_cuda_graph_capture_and_replay():
    """The run step (attention + merge over padded plan buffers) is capturable; a replay after new
    q values are copied in gives the result of a fresh call."""
    from multiverse_kernels.backends.cpu._ext import run_tree_attention

    hq, hk, d = 32, 8, 128
    f, groups = sampling_forest(prompt=500, samples=8, gen_len=5)
    meta = f.metadata(groups).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, hq, hk, d, torch.float16, device=DEV)
    plan = plan_tree_attention(meta, hq, hk, head_dim=d, capacity=PlanCapacity(4096, 4096, 4096, 64))
    run_tree_attention(q, k, v, meta, d ** -0.5, plan)  # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = run_tree_attention(q, k, v, meta, d ** -0.5, plan)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    ref, ref_lse = tree_attention(q, k, v, meta, backend="cuda", return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
