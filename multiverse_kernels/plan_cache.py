"""The per-step plan cache: :func:`cached_plan` and :func:`cached_run_plan` (tiny nodes absorbed, then
planned), memoised on the metadata's tensors so that the per-layer calls of one step plan once. It sits
above :mod:`~multiverse_kernels.planning` and :mod:`~multiverse_kernels.absorption` and below the backends
and ops that call it."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .absorption import absorb_tiny_nodes
from .metadata import ForestMetadata
from .planning import TreePlan, plan_tree_attention

__all__ = ["cached_plan", "cached_run_plan", "run_plan"]

# entries (parameters, tensors, their _stamp, a copy of CPU tensors' contents, (run_meta, plan)), newest first
_CACHE: list[tuple[tuple, tuple[Tensor, ...], tuple, tuple[Tensor, ...] | None,
                  tuple[ForestMetadata, TreePlan]]] = []
_CACHE_SIZE = 8
_CACHE_LOCK = threading.Lock()


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
    stamp = None
    with _CACHE_LOCK:  # a hit: the same parameters, tensor objects, data pointers, versions (and contents)
        for i, (held_params, held, held_stamp, copy, entry) in enumerate(_CACHE):
            if held_params != params or len(held) != len(ts) or not all(a is b for a, b in zip(held, ts)):
                continue
            stamp = stamp or _stamp(ts)
            if held_stamp == stamp and (copy is None or all(torch.equal(a, b) for a, b in zip(copy, ts))):
                _CACHE.insert(0, _CACHE.pop(i))
                return entry
    on_cpu = all(t.device.type == "cpu" for t in ts)
    if not on_cpu and any(t.is_inference() for t in ts):
        return build()
    entry = build()
    copy = tuple(t.clone() for t in ts) if on_cpu else None
    with _CACHE_LOCK:
        _CACHE.insert(0, (params, ts, stamp or _stamp(ts), copy, entry))
        del _CACHE[_CACHE_SIZE:]
    return entry


def _stamp(ts: tuple[Tensor, ...]) -> tuple:
    """The tensors' data pointers and version counters (-1 for an inference tensor: it has none)."""
    return (tuple(t.data_ptr() for t in ts), tuple(-1 if t.is_inference() else t._version for t in ts))
