"""Triton tree attention in the Triton interpreter (CPU tensors): what only it has (its limits' named
errors, the op schema's optional plan under opcheck and torch.compile, the auto order on CUDA, a run step
without host syncs). Its comparisons with the reference on random forests are in
tests/ops/test_tree_attention.py.

See tests/_triton_interp.py for what the interpreter does and does not cover (bf16 math runs in fp32
on CPU). Outputs and the fp32 workspace are poisoned with NaN for the module.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from _triton_interp import triton_interpreter  # noqa: F401  (module fixture)

import multiverse_kernels as mk
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.planning import PlanCapacity, plan_tree_attention
from multiverse_kernels.testing import (
    assert_close_to_reference,
    lse_tolerance,
    make_inputs,
    multiverse_forest,
    random_forest,
    sampling_forest,
    tolerance,
)


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
    assert_close_to_reference("out", out, ref_out, **tolerance(torch.float32))
    assert_close_to_reference("lse", lse, ref_lse, **lse_tolerance(torch.float32))


def test_auto_picks_triton_for_cuda_registration():
    from multiverse_kernels.backends import _IMPLS, AUTO_ORDER

    assert "cuda" in _IMPLS["tree_attention"]["triton"][1]
    assert AUTO_ORDER["cuda"].index("triton") < AUTO_ORDER["cuda"].index("reference")


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
    assert_close_to_reference("out", out, ref, **tolerance(torch.float16))
