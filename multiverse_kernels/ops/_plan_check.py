"""Does a caller's precomputed plan belong to the metadata it is used with? (docs/errors.md)

A plan built for another step's metadata (other rows, other node lengths) would make the kernels read
and write the wrong rows and tokens. With ``validate=True`` the op compares the passed plan with the
plan of the same ``chunk_tokens`` / ``rows_per_tile`` / ``num_workers`` for the metadata it is called
with (memoised by :func:`~multiverse_kernels.plan_cache.cached_plan`, so the per-layer calls of one step
plan once), entry by entry over the used prefix of every array, and the capacity padding. O(plan size)
per call.
"""

from __future__ import annotations

import torch

from ..metadata import ForestMetadata, MetadataError
from ..plan_cache import cached_plan
from ..planning import TreePlan

_USED = {  # field -> the int field that says how many of its entries are used
    "reader_row": "num_readers", "reader_limit": "num_readers", "reader_lo": "num_readers",
    "item_node": "num_items", "item_kv_start": "num_items", "item_kv_len": "num_items",
    "item_reader_start": "num_items", "item_num_readers": "num_items",
    "item_partial_start": "num_items",
    "merge_rows": "num_merge_rows",
}


def check_plan_matches(plan: TreePlan, meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int) -> None:
    """Raise :class:`MetadataError` naming ``plan.<field>`` unless ``plan`` is the work list of
    ``meta`` (any chunk_tokens / rows_per_tile, padded to any capacity; its window's)."""
    if plan.chunk_tokens < 1 or plan.rows_per_tile < 1:
        raise MetadataError(f"plan.chunk_tokens / plan.rows_per_tile: expected positive ints, got "
                            f"{plan.chunk_tokens} / {plan.rows_per_tile}")
    auto = plan.num_workers > 0  # chunks chosen by the planner for num_workers
    want = cached_plan(meta, num_qo_heads, num_kv_heads, chunk_tokens=None if auto else plan.chunk_tokens,
                       rows_per_tile=plan.rows_per_tile, num_workers=plan.num_workers if auto else None,
                       window=plan.window or None)
    if want is plan:  # the caller passed this metadata's cached plan itself
        return
    hint = "; was the plan built for this step's metadata?"
    for f in ("num_readers", "num_items", "num_partials", "num_merge_rows"):
        if getattr(plan, f) != getattr(want, f):
            raise MetadataError(f"plan.{f}: expected {getattr(want, f)} for this metadata, got "
                                f"{getattr(plan, f)}{hint}")
    if plan.max_item_readers < want.max_item_readers or plan.max_item_readers > plan.rows_per_tile:
        raise MetadataError(f"plan.max_item_readers: expected {want.max_item_readers}..{plan.rows_per_tile}"
                            f", got {plan.max_item_readers}{hint}")
    for f in TreePlan.TENSOR_FIELDS:
        a, b = getattr(plan, f), getattr(want, f)
        if f == "row_partial_indices":  # one entry per partial (slots, -1 for a row's only partial)
            n = int(want.row_partial_indptr[-1]) if want.row_partial_indptr.numel() else 0
        else:
            n = getattr(want, _USED[f]) if f in _USED else b.numel()
        if a.numel() < n or not torch.equal(a[:n], b[:n]):
            raise MetadataError(f"plan.{f}: does not match the plan of this metadata{hint}")
    pad_items = plan.item_num_readers[plan.num_items:]
    if pad_items.numel() and bool((pad_items != 0).any()):
        raise MetadataError("plan.item_num_readers: capacity padding items must have 0 readers")
    pad_merge = plan.merge_rows[plan.num_merge_rows:]
    if pad_merge.numel() and bool((pad_merge != -1).any()):
        raise MetadataError("plan.merge_rows: capacity padding must be -1")
