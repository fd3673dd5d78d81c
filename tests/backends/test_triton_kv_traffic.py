"""Measured KV traffic of the Triton kernels (counted at the loads in the interpreter) vs the forest's
unique KV bytes: <= 1.05x on forests whose nodes are read by up to 256 packed rows per KV head
(Multiverse, 16/64-way sampling, beam depth 4 x width 16/64 at GQA 4: 64 readers x 4 heads = 256 rows,
one 256-row tile). A control forest whose root has more readers than a tile must show more traffic, so
the counter is not just echoing the metadata.

Where the default path absorbs tiny nodes (docs/plan.md, "Tiny nodes") their tokens are loaded once per
successor on purpose (fewer bytes in all); ``_ratio`` then divides by the unique K+V of the metadata
the kernel runs (the absorbed duplicates included) and says whether anything was absorbed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from _triton_interp import triton_interpreter  # noqa: F401  (module fixture)

from multiverse_kernels.backends import resolve
from multiverse_kernels.plan_cache import cached_run_plan
from multiverse_kernels.planning import default_rows_per_tile, plan_kv_tokens
from multiverse_kernels.testing import beam_forest, make_inputs, multiverse_forest, sampling_forest

HQ, HK, D = 8, 2, 64


def _ratio(f, groups, dtype=torch.float16, absorbed: bool = False):
    """Measured K+V bytes / unique K+V bytes of the metadata the kernel runs; ``absorbed``: whether the
    default path absorbed tiny nodes (asserted)."""
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, HQ, HK, D, dtype)
    run, _ = cached_run_plan(meta, HQ, HK, head_dim=D, kv_elem_size=k.element_size())
    assert (run is not meta) == absorbed
    hook = resolve("tree_attention_kv_bytes", "triton", q.device)
    measured = hook(q, k, v, meta, D ** -0.5)
    unique = plan_kv_tokens(run) * 2 * HK * D * k.element_size()
    return measured / unique


def test_traffic_at_the_lower_bound():
    tile = default_rows_per_tile(HQ, HK, D)
    assert tile * (HQ // HK) >= 256, "the forests below need 256 packed rows per tile"
    for f, groups in (multiverse_forest(64, 8, 16, 2), sampling_forest(64, 16, 8),
                      beam_forest(32, 4, 16, 4), sampling_forest(16, 64, 1)):
        r = _ratio(f, groups)  # nothing absorbed: the ratio is over the forest's own unique bytes
        assert 1.0 <= r <= 1.05, r


@pytest.mark.slow
def test_traffic_at_the_lower_bound_wide_beam():
    """Beam depth 3 x width 64 at GQA 4: the upper levels are read by 256 packed rows per KV head."""
    f, groups = beam_forest(16, 3, 64, 1)
    r = _ratio(f, groups)
    assert 1.0 <= r <= 1.05, r


def test_traffic_other_dtypes_and_extend():
    # causal extend of the join; the last 8-token path (2 whole pages) is absorbed into the conclusion
    f, groups = multiverse_forest(48, 4, 8, 6, page_size=4, concl_q=3)
    for dtype in (torch.float32, torch.bfloat16):
        r = _ratio(f, groups, dtype, absorbed=True)
        assert 1.0 <= r <= 1.05, (dtype, r)


def test_counter_sees_extra_loads():
    """72 samples at GQA 4: the prompt's 288 packed rows need 2 tiles (of 64 readers = 256 rows), so
    its K/V is loaded twice."""
    f, groups = sampling_forest(16, 72, 1)
    r = _ratio(f, groups)
    expected = (2 * 16 + 72 * 1) / (16 + 72 * 1)
    assert abs(r - expected) < 1e-9, (r, expected)
