"""The per-step caches: :func:`cached_plan` and :func:`cached_run_plan` (tiny nodes absorbed, then
planned), and :func:`check_once` / :func:`validate_once` (the index tensors' checks), memoised on the
index tensors so that the per-layer calls of one step plan and check once. It sits above
:mod:`~multiverse_kernels.planning` and :mod:`~multiverse_kernels.absorption` and below the backends and
ops that call it."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

from .absorption import absorb_tiny_nodes
from .metadata import ForestMetadata
from .planning import TreePlan, plan_tree_attention

__all__ = ["cached_plan", "cached_run_plan", "run_plan", "check_once", "validate_once"]


class _StepMemo:
    """A small LRU of values keyed on (parameters, index tensors), safe to use from several threads. A hit
    needs equal parameters, the same tensor objects with the same data pointers and version counters
    and, for CPU tensors, the same contents (an entry keeps a copy and compares it on every hit: cheap,
    O(nodes + groups + pages) int32). Other devices are keyed without the contents (a compare would
    sync); inference tensors there (no version counter) are never stored."""

    def __init__(self, size: int) -> None:
        # entries (parameters, tensors, their _stamp, a copy of CPU tensors' contents, value), newest first
        self.entries: list[tuple[tuple, tuple[Tensor, ...], tuple, tuple[Tensor, ...] | None, object]] = []
        self.size = size
        self.lock = threading.Lock()

    def get(self, params: tuple, ts: tuple[Tensor, ...]) -> object | None:
        """The value stored for ``params`` and ``ts``, or None."""
        stamp = None
        with self.lock:
            for i, (held_params, held, held_stamp, copy, value) in enumerate(self.entries):
                if held_params != params or len(held) != len(ts) or not all(a is b for a, b in zip(held, ts)):
                    continue
                stamp = stamp or _stamp(ts)
                if held_stamp == stamp and (copy is None or all(torch.equal(a, b) for a, b in zip(copy, ts))):
                    self.entries.insert(0, self.entries.pop(i))
                    return value
        return None

    def put(self, params: tuple, ts: tuple[Tensor, ...], value: object) -> None:
        on_cpu = all(t.device.type == "cpu" for t in ts)
        if not on_cpu and any(t.is_inference() for t in ts):
            return
        copy = tuple(t.clone() for t in ts) if on_cpu else None
        with self.lock:
            self.entries.insert(0, (params, ts, _stamp(ts), copy, value))
            del self.entries[self.size:]


def _stamp(ts: tuple[Tensor, ...]) -> tuple:
    """The tensors' data pointers and version counters (-1 for an inference tensor: it has none)."""
    return (tuple(t.data_ptr() for t in ts), tuple(-1 if t.is_inference() else t._version for t in ts))


_PLANS = _StepMemo(8)
_CHECKED = _StepMemo(16)


def _all_tensors(meta: ForestMetadata) -> tuple[Tensor, ...]:
    return meta.tensors() + tuple(t for t in (meta.own_full, meta.node_pos) if t is not None)


def check_once(params: tuple, ts: tuple[Tensor, ...], check: Callable[[], None]) -> None:
    """Run ``check()`` (data checks that raise on bad input) unless it passed before for equal ``params``
    and these very tensors (identity, pointers, versions and, on CPU, contents: as :func:`cached_plan`'s
    hits), so a step's layers check its index tensors once. A check that raised is not remembered.
    Changing GPU tensors behind torch's version counter defeats it, as it does the plan cache."""
    if _CHECKED.get(params, ts) is None:
        check()
        _CHECKED.put(params, ts, True)


def validate_once(meta: ForestMetadata, num_pages: int | None = None) -> None:
    """``meta.validate(num_pages=num_pages)`` (every invariant of docs/design.md §2, page range included)
    through :func:`check_once`: once per step's metadata (~0.3 ms a check on CPU; a device sync on GPU)."""
    params = ("forest", meta.page_size, num_pages, meta.own_full is not None, meta.node_pos is not None)
    check_once(params, _all_tensors(meta), lambda: meta.validate(num_pages=num_pages))


def cached_plan(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, *, head_dim: int = 128,
                chunk_tokens: int | None = None, rows_per_tile: int | None = None,
                num_workers: int | None = None, window: int | None = None) -> TreePlan:
    """:func:`plan_tree_attention`, memoised on the metadata's *tensors*, so that the per-layer calls of
    one step plan once even when no plan is passed and the metadata object is rebuilt from its tensors
    (as the custom op does). A small LRU of 8 entries, safe to call from several threads.

    A hit needs the same tensor objects (identity, data pointer, version counter) AND, for CPU tensors,
    the same contents: an entry keeps a copy of the index tensors and compares it on every hit (cheap:
    O(nodes + groups + pages) int32), so metadata changed in place by a route that does not bump
    torch's version counter (a ``.numpy()`` view, ``.data``, a shared buffer) is planned afresh instead
    of reusing a stale plan. On other devices (a content compare would sync) entries are keyed by
    identity, data pointer and version only: after changing GPU metadata behind torch's back, pass an
    explicit ``plan=``. Inference-mode GPU tensors (no version counter) are planned afresh every time.

    ``window``: a sliding window (``reader_lo`` from ``meta.positions()``); part of the key, like
    ``meta.node_pos``.
    """
    return _cached(meta, num_qo_heads, num_kv_heads, head_dim, chunk_tokens, rows_per_tile, num_workers,
                   None, window)[1]


def cached_run_plan(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, *, head_dim: int = 128,
                    kv_elem_size: int = 2, chunk_tokens: int | None = None, rows_per_tile: int | None = None,
                    num_workers: int | None = None, window: int | None = None
                    ) -> tuple[ForestMetadata, TreePlan]:
    """The forward's default step: ``run_meta = absorb_tiny_nodes(meta, ...)`` (docs/plan.md, "Tiny
    nodes"; ``meta`` itself when nothing is absorbed) and its plan, memoised like :func:`cached_plan`.

    The kernels must then read the caches through ``run_meta``'s page table (its node ids are the
    plan's). Returns ``(run_meta, plan)``. With a ``window`` nothing is absorbed (absorption rewrites
    node ids and would move the positions the window measures): ``run_meta`` is ``meta``.
    """
    return _cached(meta, num_qo_heads, num_kv_heads, head_dim, chunk_tokens, rows_per_tile, num_workers,
                   kv_elem_size if window is None else None, window)


def run_plan(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, *, head_dim: int = 128,
             kv_elem_size: int = 2, chunk_tokens: int | None = None, rows_per_tile: int | None = None,
             num_workers: int | None = None, window: int | None = None) -> tuple[ForestMetadata, TreePlan]:
    """:func:`cached_run_plan` without the cache: for a caller that keeps the step's plan itself (the
    vLLM backend's metadata) and would only pay for the cache's key and content copies."""
    return _build(meta, num_qo_heads, num_kv_heads, head_dim, chunk_tokens, rows_per_tile, num_workers,
                  kv_elem_size if window is None else None, window)


def _build(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, head_dim: int,
           chunk_tokens: int | None, rows_per_tile: int | None, num_workers: int | None,
           absorb_elem: int | None, window: int | None) -> tuple[ForestMetadata, TreePlan]:
    run = meta
    if absorb_elem is not None:
        run = absorb_tiny_nodes(meta, num_qo_heads, num_kv_heads, head_dim=head_dim, kv_elem_size=absorb_elem)
    return run, plan_tree_attention(run, num_qo_heads, num_kv_heads, chunk_tokens=chunk_tokens,
                                    rows_per_tile=rows_per_tile, head_dim=head_dim, num_workers=num_workers,
                                    window=window)


def _cached(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, head_dim: int,
            chunk_tokens: int | None, rows_per_tile: int | None, num_workers: int | None,
            absorb_elem: int | None, window: int | None = None) -> tuple[ForestMetadata, TreePlan]:
    def build() -> tuple[ForestMetadata, TreePlan]:
        return _build(meta, num_qo_heads, num_kv_heads, head_dim, chunk_tokens, rows_per_tile, num_workers,
                      absorb_elem, window)

    ts = meta.tensors() + ((meta.own_full,) if meta.own_full is not None else ())
    if window is not None:  # the window measures in node_pos (default positions: from the tensors)
        ts = ts + ((meta.node_pos,) if meta.node_pos is not None else ())
    params = (meta.page_size, num_qo_heads, num_kv_heads, head_dim, chunk_tokens, rows_per_tile, num_workers,
              absorb_elem, window, window is not None and meta.node_pos is not None)
    entry = _PLANS.get(params, ts)
    if entry is None:
        entry = build()
        _PLANS.put(params, ts, entry)
    return entry
