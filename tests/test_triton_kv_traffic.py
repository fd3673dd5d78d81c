"""Measured KV traffic of the Triton kernels (counted at the loads in the interpreter) vs the forest's
unique KV bytes: <= 1.05x on forests whose nodes' readers fit one tile (Multiverse, 16-way sampling,
beam depth 4 x width 16). A control forest whose root has more readers than a tile must show more
traffic, so the counter is not just echoing the metadata."""

from __future__ import annotations

import torch
from _triton_interp import triton_interpreter  # noqa: F401  (module fixture)

from multiverse_kernels.backends import resolve
from multiverse_kernels.planning import default_rows_per_tile, plan_kv_tokens
from multiverse_kernels.testing import beam_forest, make_inputs, multiverse_forest, sampling_forest

HQ, HK, D = 8, 2, 64


def _ratio(f, groups, dtype=torch.float16):
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, HQ, HK, D, dtype)
    hook = resolve("tree_attention_kv_bytes", "triton", q.device)
    measured = hook(q, k, v, meta, D ** -0.5)
    unique = plan_kv_tokens(meta) * 2 * HK * D * k.element_size()
    return measured / unique


def test_traffic_at_the_lower_bound():
    tile = default_rows_per_tile(HQ, HK, D)
    assert tile >= 16, "the forests below need every node's readers to fit one tile"
    for f, groups in (multiverse_forest(64, 8, 16, 2), sampling_forest(64, 16, 8),
                      beam_forest(32, 4, 16, 4)):
        r = _ratio(f, groups)
        assert 1.0 <= r <= 1.05, r


def test_traffic_other_dtypes_and_extend():
    f, groups = multiverse_forest(48, 4, 8, 6, page_size=4, concl_q=3)  # causal extend of the join
    for dtype in (torch.float32, torch.bfloat16):
        r = _ratio(f, groups, dtype)
        assert 1.0 <= r <= 1.05, (dtype, r)


def test_counter_sees_extra_loads():
    """64 samples: the prompt's 64 readers need 4 tiles of 16, so its K/V is loaded 4 times."""
    f, groups = sampling_forest(64, 64, 8)
    r = _ratio(f, groups)
    expected = (4 * 64 + 64 * 8) / (64 + 64 * 8)
    assert abs(r - expected) < 1e-9, (r, expected)
