"""CUDA backend: the kernels of ``multiverse_kernels._C_cuda`` (csrc/cuda/), compiled for sm_90a and
sm_100a. fp16/bf16 with head_dim 64/128/256 run the tensor-core kernel (mma.sync m16n8k16, cp.async
double-buffered 16-byte loads); fp32 and other head dims <= 256 a SIMT kernel; float64 goes to the
reference. Uses the plan of :mod:`multiverse_kernels.planning` with its defaults (row tile
``MAX_TILE_ROWS[head_dim]`` packed rows, chunks chosen for 2 items per SM), memoised on the metadata
tensors (plan once per step); the kernel runs an item's rows in passes of 64 or 128 (its CTA tile). Registers
``tree_attention_kv_bytes`` too (bytes counted by the kernel with a device atomic at its loads).

Variants (multiverse_kernels/variants.py, docs/design.md "Attention variants"), forward only, in both
kernels: ``window`` (the plan's ``reader_lo``: the planner drops the chunks outside every row's window;
the tensor-core kernel starts each row tile's KV blocks at the tile's smallest first visible token, so
the tokens below it are not loaded, and every row masks ``lo <= t < limit``), ``softcap``
(``s = c tanh(s / c)`` on the scaled score, before the mask and the softmax), and ``fp8`` KV caches
(``float8_e4m3fn`` / ``float8_e5m2`` with float16 / bfloat16 q and float32 ``k_scale`` / ``v_scale`` of
shape ``[1]`` or ``[Hk]``): the tensor-core kernel streams the fp8 bytes with the same 16-byte cp.async
copies (16 elements each) into a double-buffered staging area and converts each KV block into q's dtype
before its mma loop (exact: every fp8 value is an fp16 and a bf16 value); the scales are folded into the
score scale (``k_scale`` of the CTA's KV head) and the output (``v_scale``) in fp32, the SIMT kernel
converts at each load (same folding); both count 1 byte per fp8 element. ``sinks`` are the op's (merged
into the kernel's output); no backward is declared (``auto`` takes another backend's; fp8 is forward only).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..._native import load_extension
from ...metadata import ForestMetadata
from ...plan_cache import cached_run_plan
from ...planning import TreePlan, check_plan_window
from ...variants import PLAIN, Variant
from .. import register
from .._cuda_align import misaligned
from ..cpu import append_paged_kv, merge_states  # same torch.ops.multiverse_C ops, CUDA-key kernels
from ..cpu._ext import run_tree_attention
from ..reference import tree_attention as _ref_attention

load_extension("_C_cuda")

__all__ = ["tree_attention", "merge_states", "append_paged_kv", "tree_attention_kv_bytes"]

CHUNK_TOKENS = None  # chosen per node from the forest and the SM count (planning.auto_chunk_tokens)
_NATIVE = (torch.float32, torch.float16, torch.bfloat16)


_WARNED: set[str] = set()  # one warning per process (tests clear it)


def _warn_if_misaligned(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    if "misaligned" in _WARNED:
        return
    why = misaligned(q, k_cache, v_cache)
    if why is not None:
        _WARNED.add("misaligned")
        warnings.warn(f"tree_attention[cuda]: {why}, so this launch (and every such launch; warned "
                      f"once) runs the scalar kernel, 10-100x slower than the tensor-core kernel; pass "
                      f"contiguous tensors", UserWarning, stacklevel=3)


def _run_plan(q: Tensor, k_cache: Tensor, meta: ForestMetadata,
              window: int | None = None) -> tuple[ForestMetadata, TreePlan]:
    """The default: tiny nodes absorbed (plan_cache.cached_run_plan; not with a window), then planned
    (for ``window``: each reader's ``reader_lo``)."""
    return cached_run_plan(meta, q.shape[1], k_cache.shape[2], head_dim=q.shape[2],
                           kv_elem_size=k_cache.element_size(), chunk_tokens=CHUNK_TOKENS, window=window)


def tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata,
                   sm_scale: float, plan: TreePlan | None = None,
                   variant: Variant = PLAIN) -> tuple[Tensor, Tensor]:
    """q [total_q, Hq, D]; caches [num_pages, page_size, Hk, D] -> (out like q, lse [total_q, Hq] f32).

    ``plan``: a precomputed plan for ``meta`` (built with the call's ``window``); default: the cached
    plan of ``meta`` (tiny nodes absorbed, not with a window). ``variant``: window, softcap and fp8 caches
    (``k_scale`` / ``v_scale``; sinks are the op's)."""
    if q.dtype not in _NATIVE or q.shape[-1] > 256:
        return _ref_attention(q, k_cache, v_cache, meta, sm_scale, variant=variant)
    _warn_if_misaligned(q, k_cache, v_cache)
    if plan is None:
        meta, plan = _run_plan(q, k_cache, meta, variant.window)
    else:
        check_plan_window(plan, variant.window)
    return run_tree_attention(q, k_cache, v_cache, meta, sm_scale, plan, softcap=variant.softcap,
                              k_scale=variant.k_scale, v_scale=variant.v_scale)


tree_attention.supports_plan = True
tree_attention.variants = frozenset({"window", "softcap", "fp8"})


def tree_attention_kv_bytes(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata,
                            sm_scale: float, window: int | None = None, k_scale: Tensor | None = None,
                            v_scale: Tensor | None = None) -> int:
    """K+V bytes the CUDA kernel loads from the caches in one call (device atomic counter); ``window``:
    with a sliding window (the tokens below a row tile's first visible one are not loaded); fp8 caches
    take ``k_scale`` / ``v_scale`` and count 1 byte per element."""
    counter = torch.zeros(1, dtype=torch.int64, device=q.device)
    run_meta, plan = _run_plan(q, k_cache, meta, window)
    run_tree_attention(q, k_cache, v_cache, run_meta, sm_scale, plan, counter, k_scale=k_scale,
                       v_scale=v_scale)
    return int(counter.item())


register("tree_attention", "cuda", ("cuda",))(tree_attention)
register("merge_states", "cuda", ("cuda",))(merge_states)
register("append_paged_kv", "cuda", ("cuda",))(append_paged_kv)
register("tree_attention_kv_bytes", "cuda", ("cuda",))(tree_attention_kv_bytes)
