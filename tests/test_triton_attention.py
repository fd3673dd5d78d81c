"""Triton tree attention in the Triton interpreter (CPU tensors) against the reference.

See tests/_triton_interp.py for what the interpreter does and does not cover (bf16 math runs in fp32
on CPU). Outputs and the fp32 workspace are poisoned with NaN before every launch.
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import triton_interpreter  # noqa: F401  (module fixture)

import multiverse_kernels as mk
from multiverse_kernels.backends.triton.tree_attention import MAX_BLOCK_M
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.planning import PlanCapacity, plan_tree_attention
from multiverse_kernels.testing import (
    beam_forest,
    eagle_tree_forest,
    make_inputs,
    multiverse_forest,
    random_forest,
    sampling_forest,
    tolerance,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GQA = ((2, 2), (4, 2), (4, 1), (8, 1))  # ratios 1, 2, 4, 8
HEAD_DIMS = (64, 128, 256)
PAGE_SIZES = (1, 4, 16)


def _compare(meta, num_pages, hq, hk, d, dtype, seed=0, plan=None, sm_scale=None):
    q, k, v = make_inputs(meta, num_pages, hq, hk, d, dtype, seed=seed)
    out, lse = mk.tree_attention(q, k, v, meta, sm_scale=sm_scale, return_lse=True, backend="triton",
                                 plan=plan)
    ref_out, ref_lse = mk.tree_attention(q, k, v, meta, sm_scale=sm_scale, return_lse=True,
                                         backend="reference")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (poisoned) outputs"
    torch.testing.assert_close(out, ref_out, **tolerance(dtype))
    lse_tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(lse, ref_lse, atol=lse_tol, rtol=lse_tol)
    return out, lse


# Each seed picks one point of the grid (periods 3, 3, 4, 3 are mixed by the seed) so that 24 seeds
# cover every head_dim x dtype pair, every page size and GQA ratio, split chunks and several tiles.
@pytest.mark.parametrize("seed", range(24))
def test_random_forests(seed):
    d = HEAD_DIMS[seed % 3]
    dtype = DTYPES[(seed // 3) % 3]
    page_size = PAGE_SIZES[(seed // 2) % 3]
    hq, hk = GQA[seed % 4]
    f, groups = random_forest(seed, page_size=page_size, max_len=20, max_nodes=8)
    meta = f.metadata(groups)
    if seed % 5 == 4:
        meta = meta.with_own_full(torch.arange(meta.num_groups) % 2 == 0)
    chunk = [8, 512, 5][seed % 3]
    rpt = [None, 2, 1][(seed // 3) % 3]
    plan = plan_tree_attention(meta, hq, hk, chunk_tokens=chunk, rows_per_tile=rpt, head_dim=d)
    _compare(meta, f.num_pages, hq, hk, d, dtype, seed=seed, plan=plan, sm_scale=0.7 / d ** 0.5)


@pytest.mark.parametrize("kind", ["multiverse", "sampling", "beam", "eagle"])
def test_real_use_forests(kind):
    f, groups = {
        "multiverse": lambda: multiverse_forest(prefix=40, paths=8, path_len=6, concl_len=3, concl_q=2),
        "sampling": lambda: sampling_forest(prompt=30, samples=16, gen_len=3),
        "beam": lambda: beam_forest(prompt=12, depth=4, width=16, step_len=2),
        "eagle": lambda: eagle_tree_forest(prefix=20, page_size=1),
    }[kind]()
    _compare(f.metadata(groups), f.num_pages, 4, 1, 64, torch.float16)


def test_default_plan_and_extend_own_full():
    """No plan passed (the backend plans), extend with q_len = node_len (training-like), own_full."""
    f = mk.KVForest(64, 4)
    root = f.new_sequence(9)
    a, b = f.fork(root, 2)
    f.append(a, 7)
    f.append(b, 1)
    meta = f.metadata([(root, 9), (a, 7), (b, 1)])
    _compare(meta, f.num_pages, 4, 2, 64, torch.float32)
    _compare(meta.with_own_full(True), f.num_pages, 4, 2, 128, torch.float16)


def test_plan_with_capacity_padding():
    """A padded plan (padding items with no readers, merge_rows -1) gives the same result."""
    f, groups = random_forest(5, page_size=4, max_nodes=8)
    meta = f.metadata(groups)
    p = plan_tree_attention(meta, 4, 2, chunk_tokens=6, rows_per_tile=2, head_dim=64)
    cap = PlanCapacity(p.num_readers + 3, p.num_items + 5, p.num_partials + 4, p.num_merge_rows + 3)
    pp = plan_tree_attention(meta, 4, 2, chunk_tokens=6, rows_per_tile=2, head_dim=64, capacity=cap)
    out1, _ = _compare(meta, f.num_pages, 4, 2, 64, torch.float32, plan=p)
    out2, _ = _compare(meta, f.num_pages, 4, 2, 64, torch.float32, plan=pp)
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)


def test_rows_that_see_nothing_and_empty_groups():
    """Groups with q_len 0, empty nodes listed (no readers): rows still correct; no row is unwritten."""
    f = mk.KVForest(32, 4)
    root = f.new_sequence(5)
    e = f.fork(root, 1)[0]  # empty node
    c = f.fork(e, 1)[0]
    f.append(c, 2)
    meta = f.metadata([(e, 0), (c, 2)])
    _compare(meta, f.num_pages, 2, 2, 64, torch.float32)
    no_rows = f.metadata([(c, 0)])
    q, k, v = make_inputs(no_rows, f.num_pages, 2, 2, 64, torch.float16)
    out, lse = mk.tree_attention(q, k, v, no_rows, return_lse=True, backend="triton")
    assert out.shape == (0, 2, 64) and lse.shape == (0, 2)


def test_bad_inputs():
    f, groups = sampling_forest(prompt=8, samples=2, gen_len=2)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 64, torch.float64)
    with pytest.raises(MetadataError, match="q: backend 'triton' supports float16"):
        mk.tree_attention(q, k, v, meta, backend="triton")
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 96, torch.float32)
    with pytest.raises(MetadataError, match="head_dim"):
        mk.tree_attention(q, k, v, meta, backend="triton")
    f2, g2 = sampling_forest(prompt=8, samples=10, gen_len=2)
    meta2 = f2.metadata(g2)
    q2, k2, v2 = make_inputs(meta2, f2.num_pages, 8, 1, 256, torch.float32)
    plan = plan_tree_attention(meta2, 8, 1, rows_per_tile=16)  # 10 readers x 8 heads > 64 rows
    with pytest.raises(MetadataError, match="rows_per_tile"):
        mk.tree_attention(q2, k2, v2, meta2, backend="triton", plan=plan)
    q3, k3, v3 = make_inputs(meta, f.num_pages, 128, 1, 256, torch.float16)
    with pytest.raises(MetadataError, match="GQA group"):
        mk.tree_attention(q3, k3, v3, meta, backend="triton")
    q, k, v = make_inputs(meta, f.num_pages, 8, 1, 256, torch.float32)
    bad = plan_tree_attention(f.metadata(groups[:1]), 8, 1)
    with pytest.raises(MetadataError, match="plan.row_partial_indptr"):
        mk.tree_attention(q, k, v, meta, backend="triton", plan=bad)


def test_op_with_plan_opcheck_and_compile():
    """The op schema's optional plan (Tensor[]? + int[]?) passes opcheck and traces with fullgraph."""
    f, groups = multiverse_forest(prefix=12, paths=2, path_len=3, concl_len=2, page_size=4)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 64, torch.float32)
    plan = plan_tree_attention(meta, 4, 2, chunk_tokens=8, head_dim=64)
    args = (q, k, v, *meta.tensors(), None, 0.125, "triton", True, plan.tensors(), plan.ints())
    torch.library.opcheck(torch.ops.multiverse.tree_attention.default, args)

    def step(q, k, v):
        return mk.tree_attention(q, k, v, meta, sm_scale=0.125, backend="triton", plan=plan,
                                 validate=False, return_lse=True)

    torch._dynamo.reset()
    out, lse = torch.compile(step, fullgraph=True)(q, k, v)
    ref_out, ref_lse = mk.tree_attention(q, k, v, meta, sm_scale=0.125, backend="reference",
                                         return_lse=True)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.float32))
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_auto_picks_triton_for_cuda_registration():
    from multiverse_kernels.backends import _IMPLS, AUTO_ORDER

    assert "cuda" in _IMPLS["tree_attention"]["triton"][1]
    assert AUTO_ORDER["cuda"].index("triton") < AUTO_ORDER["cuda"].index("reference")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24, 60))
def test_random_forests_sweep(seed):
    """Heavier sweep: larger forests, every (head_dim, dtype, page size, GQA) combination over seeds."""
    d = HEAD_DIMS[seed % 3]
    dtype = DTYPES[(seed // 3) % 3]
    page_size = (1, 4, 16, 32, 128)[seed % 5]
    hq, hk = ((2, 2), (4, 2), (8, 2), (8, 1), (16, 1))[(seed // 2) % 5]
    f, groups = random_forest(seed, page_size=page_size, max_len=48, max_nodes=12)
    meta = f.metadata(groups)
    rpt = [None, min(3, max(1, MAX_BLOCK_M[d] // (hq // hk)))][seed % 2]
    plan = plan_tree_attention(meta, hq, hk, chunk_tokens=[16, 512, 7][seed % 3], rows_per_tile=rpt,
                               head_dim=d)
    _compare(meta, f.num_pages, hq, hk, d, dtype, seed=seed, plan=plan)


def test_run_step_has_no_host_sync(monkeypatch):
    """With a precomputed plan and validate=False the run step reads no tensor value on the host (no
    .item() / int() / bool() / .tolist()): the precondition for capturing it in a CUDA graph."""
    f, groups = random_forest(7, page_size=4, max_nodes=8)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 64, torch.float16)
    cap = PlanCapacity(256, 256, 256, 64)
    plan = plan_tree_attention(meta, 4, 2, chunk_tokens=8, head_dim=64, capacity=cap)
    ref = mk.tree_attention(q, k, v, meta, backend="reference")

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the run step")

    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    out = mk.tree_attention(q, k, v, meta, backend="triton", plan=plan, validate=False)
    monkeypatch.undo()
    torch.testing.assert_close(out, ref, **tolerance(torch.float16))
