"""CPU backend: the C++ kernels of ``multiverse_kernels._C`` (csrc/cpu/), multi-threaded with ATen's
thread pool, fp32 accumulation, fp32/fp16/bf16 inputs, fp8 KV caches in the forward (float64 inputs go
to the reference, which is the float64-capable specification).

tree_attention plans the step with :func:`multiverse_kernels.planning.plan_tree_attention` putting
all readers of a node in one work item (up to ``MAX_ITEM_ROWS`` packed rows), so every node's K/V chunk
is loaded from the cache exactly once per KV head and shared by every row that sees it; the plan is
memoised on the metadata tensors (:func:`~multiverse_kernels.plan_cache.cached_plan`: plan once per
step, reuse in every layer). Also registers the measurement hook
``tree_attention_kv_bytes`` (bytes counted by the kernel at its loads).

Variants (multiverse_kernels/variants.py): ``window`` (the plan's ``reader_lo``: the planner drops the
chunks outside every row's window, the kernels mask below each row's first visible token) and
``softcap`` (``s = c tanh(s / c)`` in the kernels, ``dS *= 1 - (s / c)^2`` in the backward), forward
and backward; ``sinks`` are the op's; ``fp8`` KV caches (``float8_e4m3fn`` / ``float8_e5m2`` with
float16 / bfloat16 q and float32 ``k_scale`` / ``v_scale`` of shape ``[1]`` or ``[Hk]``), forward only:
the kernels dequantize each K/V element at the load (``float(x) * scale``, exact conversion, one
rounding, as the reference) and count 1 byte per element. The backward does not declare fp8 (the op
raises: an fp8 cache is forward only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._native import load_extension
from ...metadata import ForestMetadata
from ...plan_cache import cached_plan, cached_run_plan, run_plan
from ...planning import TreePlan, check_plan_window
from ...variants import PLAIN, Variant
from .. import register
from ..reference import append_paged_kv as _ref_append
from ..reference import merge_states as _ref_merge
from ..reference import tree_attention as _ref_attention
from ..reference import tree_attention_backward as _ref_backward
from ._ext import run_tree_attention, run_tree_attention_backward

load_extension("_C")

__all__ = ["tree_attention", "tree_attention_backward", "merge_states", "append_paged_kv",
           "tree_attention_kv_bytes", "CHUNK_TOKENS"]

# Tokens per work item: None = chosen per node by the planner from the forest and the thread count
# (planning.auto_chunk_tokens): a node is split only as far as the threads need work and never finer
# than its packed rows, so packed training (every row reads a whole node) writes no partial states
# and the workspace stays linear in L. (A fixed 256 gave each causal row one partial per 256 keys it
# sees: 247 MB at L = 8K, 3.9 GB at 32K.) The kernels stream a chunk in 48-token blocks (forward) and
# 256-token sub-chunks (backward), so long chunks keep their K/V working set in L2.
CHUNK_TOKENS = None
# Packed rows (readers x GQA heads) per work item: every reader of a node in one item (each chunk
# loaded once) up to 1024 rows, e.g. 256 branches at GQA 4; beyond that (long extends) the node's
# readers are split into tiles so the per-thread scratch stays ~1-2 MB.
MAX_ITEM_ROWS = 1024
_NATIVE = (torch.float32, torch.float16, torch.bfloat16)


def _plan(q: Tensor, k_cache: Tensor, meta: ForestMetadata, window: int | None = None) -> TreePlan:
    """The backward's plan (the metadata as given)."""
    group = q.shape[1] // k_cache.shape[2]
    return cached_plan(meta, q.shape[1], k_cache.shape[2], head_dim=q.shape[2],
                       chunk_tokens=CHUNK_TOKENS, rows_per_tile=max(1, MAX_ITEM_ROWS // group), window=window)


def _run_plan(q: Tensor, k_cache: Tensor, meta: ForestMetadata, window: int | None = None, *,
              cached: bool = True, num_workers: int | None = None) -> tuple[ForestMetadata, TreePlan]:
    """The forward's default: tiny nodes absorbed (plan_cache.cached_run_plan; not with a window), then
    planned. ``cached=False``: plan_cache.run_plan (for a caller that keeps the step's plan itself);
    ``num_workers``: the planner's (default: the thread count)."""
    return step_plan(meta, q.shape[1], k_cache.shape[2], q.shape[2], k_cache.element_size(), window,
                     cached=cached, num_workers=num_workers)


def step_plan(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, head_dim: int, kv_elem_size: int,
              window: int | None = None, *, cached: bool = True,
              num_workers: int | None = None) -> tuple[ForestMetadata, TreePlan]:
    """:func:`_run_plan` from the step's shapes instead of its tensors (an engine's metadata builder plans
    before any layer runs): ``(run_meta, plan)`` for q [*, num_qo_heads, head_dim] and caches of
    ``kv_elem_size``-byte elements with ``num_kv_heads`` heads."""
    group = num_qo_heads // num_kv_heads
    return (cached_run_plan if cached else run_plan)(
        meta, num_qo_heads, num_kv_heads, head_dim=head_dim, kv_elem_size=kv_elem_size,
        chunk_tokens=CHUNK_TOKENS, rows_per_tile=max(1, MAX_ITEM_ROWS // group), num_workers=num_workers,
        window=window)


def tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata,
                   sm_scale: float, plan: TreePlan | None = None,
                   variant: Variant = PLAIN) -> tuple[Tensor, Tensor]:
    """q [total_q, Hq, D]; caches [num_pages, page_size, Hk, D] -> (out like q, lse [total_q, Hq] f32).

    ``plan``: a precomputed plan for ``meta`` (any chunk_tokens / rows_per_tile, built with the call's
    ``window``); default: the cached CPU plan (every reader of a node in one item) of ``meta`` with its
    tiny nodes absorbed (not with a window). ``variant``: window, softcap and fp8 caches (sinks are the
    op's).
    """
    if q.dtype not in _NATIVE:
        return _ref_attention(q, k_cache, v_cache, meta, sm_scale, variant=variant)
    if plan is None:
        meta, plan = _run_plan(q, k_cache, meta, variant.window)
    else:
        check_plan_window(plan, variant.window)
    return run_tree_attention(q, k_cache, v_cache, meta, sm_scale, plan, softcap=variant.softcap,
                              k_scale=variant.k_scale, v_scale=variant.v_scale)


tree_attention.supports_plan = True  # ops.tree_attention passes a caller's precomputed plan
tree_attention.variants = frozenset({"window", "softcap", "fp8"})


def tree_attention_backward(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k_cache: Tensor,
                            v_cache: Tensor, out: Tensor, lse: Tensor, meta: ForestMetadata,
                            sm_scale: float, variant: Variant = PLAIN) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq like q; dk, dv like the caches, 0 on slots no row sees) of tree_attention, by the
    fused C++ backward (csrc/cpu/tree_attention_backward.cpp) over the forward's cached plan.

    grad_out [total_q, Hq, D]; grad_lse [total_q, Hq] or None; out, lse (float32) the forward's
    outputs. float64 inputs go to the reference backward.
    """
    if q.dtype not in _NATIVE:
        return _ref_backward(grad_out, grad_lse, q, k_cache, v_cache, out, lse, meta, sm_scale,
                             variant=variant)
    return run_tree_attention_backward(grad_out, grad_lse, q, k_cache, v_cache, out, lse, meta, sm_scale,
                                       _plan(q, k_cache, meta, variant.window), softcap=variant.softcap)


tree_attention_backward.variants = frozenset({"window", "softcap"})


def tree_attention_kv_bytes(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata,
                            sm_scale: float, window: int | None = None, k_scale: Tensor | None = None,
                            v_scale: Tensor | None = None) -> int:
    """K+V bytes the CPU kernel loads from the caches in one call, counted by the kernel itself (the
    caches' element size per element: 1 byte for fp8 caches, which take ``k_scale`` / ``v_scale``)."""
    if q.dtype not in _NATIVE:
        raise RuntimeError(f"q: the cpu kernel runs float32/float16/bfloat16, got {q.dtype}")
    counter = torch.zeros(1, dtype=torch.int64)
    run_meta, plan = _run_plan(q, k_cache, meta, window)
    run_tree_attention(q, k_cache, v_cache, run_meta, sm_scale, plan, counter, k_scale=k_scale,
                       v_scale=v_scale)
    return int(counter.item())


def merge_states(v: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """v [N, S, H, D], s [N, S, H] -> (out [N, H, D] v.dtype, lse [N, H] float32)."""
    if v.dtype not in _NATIVE or s.dtype != torch.float32:
        return _ref_merge(v, s)
    return torch.ops.multiverse_C.merge_states(v, s)


def append_paged_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, page_indptr: Tensor,
                    page_indices: Tensor, token_node: Tensor, token_pos: Tensor) -> None:
    """k, v [n, Hk, D] -> k_cache, v_cache [num_pages, page_size, Hk, D] in place."""
    if k.dtype not in _NATIVE or k_cache.dtype not in _NATIVE or k.stride(-1) != 1 or v.stride(-1) != 1:
        return _ref_append(k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos)
    torch.ops.multiverse_C.append_paged_kv(k, v, k_cache, v_cache, page_indptr, page_indices, token_node,
                                           token_pos)


register("tree_attention", "cpu", ("cpu",))(tree_attention)
register("tree_attention_backward", "cpu", ("cpu",))(tree_attention_backward)
register("merge_states", "cpu", ("cpu",))(merge_states)
register("append_paged_kv", "cpu", ("cpu",))(append_paged_kv)
register("tree_attention_kv_bytes", "cpu", ("cpu",))(tree_attention_kv_bytes)
