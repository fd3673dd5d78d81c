"""Triton tree attention over a plan (docs/plan.md): one program per (work item, KV head).

A program loads its chunk of one node's K/V once, through the node's page table, and computes the
partial softmax state of every (reader, GQA head) row of the item with ``tl.dot``: the readers' query
heads that share the KV head are packed into the row dimension (row m = reader m // group, head
h * group + m % group). Online softmax in fp32 (base 2: scores are pre-multiplied by log2(e)).
A row whose query row has a single partial is written straight to ``out``/``lse``; the others go to the
fp32 workspace and are merged by :mod:`.merge_states`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...metadata import ForestMetadata, MetadataError
from ...plan_cache import cached_run_plan
from ...planning import TreePlan
from ...tiles import HEAD_DIMS, MAX_BLOCK_M, TILES, VARIANT_TILES
from ...variants import FP8_DTYPES, PLAIN, Variant
from ._common import interpret_math_fp32, launch, next_pow2
from .merge_states import launch_merge

LOG2E = 1.4426950408889634
# Tests set this: fill out/lse/workspace with NaN before each launch so unwritten elements fail.
POISON = False


@triton.jit
def _kv_block(q, K, V, NodePageIndices, page_base, h, hi, lo, lim, qk_scale, cap2, page_size,
              stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
              k, v, t, t1, page1, m_i, l_i, acc, bad, v_any,
              offs_d, BLOCK_N: tl.constexpr, MATH_FP32: tl.constexpr, IEEE_DOT: tl.constexpr,
              PREFETCH: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
              KV_FP8: tl.constexpr):
    """One KV block b (tokens t) of the attention loop; returns the carried state for block b+1.

    Software pipeline (register double buffer, PREFETCH tiles): before block b's two dot products run,
    the loads of block b+1's K/V tiles (t1; their page numbers page1 are already here) and of block
    b+2's page numbers are issued, so they are in flight while block b computes; nothing waits on a load
    right after issuing it. Loads past `hi` are masked off (the last block loads nothing). Tiles whose
    double buffer does not fit in registers (head_dim 256) load block b's K and V here instead (V's
    load then overlaps the QK^T dot and the softmax).

    Variants (compile-time flags, off: the plain kernel's code): KV_FP8 converts the fp8 K/V tiles to
    q's dtype (exact) before the dots, the scales being folded into qk_scale and the output; SOFTCAP
    maps the base-2 score to ``cap2 * tanh(x)`` (``qk_scale`` then holds ``2 log2(e) sm_scale / c``, so
    ``tanh(x) = 1 - 2 / (exp2(s) + 1)``); WINDOW also masks tokens before each row's ``lo``.
    """
    t_ok = t < hi
    t2 = t1 + BLOCK_N
    if PREFETCH:
        # issue block b+1's K/V loads and block b+2's page-number loads
        ok1 = t1 < hi
        k_next = tl.load(K + (page1 * stride_kp + (t1 % page_size) * stride_ks + h * stride_kh)[:, None]
                         + offs_d[None, :], mask=ok1[:, None], other=0.0)
        v_next = tl.load(V + (page1 * stride_vp + (t1 % page_size) * stride_vs + h * stride_vh)[:, None]
                         + offs_d[None, :], mask=ok1[:, None], other=0.0)
        page2 = tl.load(NodePageIndices + page_base + t2 // page_size, mask=t2 < hi, other=0).to(tl.int64)
        kb = k
        vb = v
    else:
        page = tl.load(NodePageIndices + page_base + t // page_size, mask=t_ok, other=0).to(tl.int64)
        kb = tl.load(K + (page * stride_kp + (t % page_size) * stride_ks + h * stride_kh)[:, None]
                     + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        vb = tl.load(V + (page * stride_vp + (t % page_size) * stride_vs + h * stride_vh)[:, None]
                     + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        k_next = k
        v_next = v
        page2 = page1
    # block b
    if KV_FP8:  # fp8 -> q's dtype is exact; the scales are applied to the scores and the output
        kb = kb.to(q.dtype)
        vb = vb.to(q.dtype)
    if MATH_FP32:
        kb = kb.to(tl.float32)
        vb = vb.to(tl.float32)
    if IEEE_DOT:
        s = tl.dot(q, tl.trans(kb), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kb))
    s = s * qk_scale
    seen_t = (t[None, :] < lim[:, None]) & t_ok[None, :]
    if WINDOW:
        seen_t = seen_t & (t[None, :] >= lo[:, None])
    s_bad = seen_t & ((s - s) != 0.0)  # s - s is NaN exactly when s is NaN or +-Inf
    bad = tl.maximum(bad, tl.max(s_bad.to(tl.int32), axis=1))
    if SOFTCAP:  # (checked before the cap: tanh would hide an infinite score) c tanh(s0 / c), base 2
        s = cap2 - (cap2 + cap2) / (tl.math.exp2(s) + 1.0)
    s = tl.where(seen_t & (s_bad == 0), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # Non-finite V: zero it so that 0 * NaN cannot leak into rows that do not see the token; the
    # kernel remembers that it happened (v_any) and poisons the rows that see such a token after the
    # loop (_poison_bad_v), so the common path carries no extra [rows, dims] state.
    v_bad = (vb - vb) != 0.0
    vb = tl.where(v_bad, 0.0, vb)
    v_any = tl.maximum(v_any, tl.max(tl.max(v_bad.to(tl.int32), axis=1), axis=0))
    if IEEE_DOT:
        pv = tl.dot(p, vb, input_precision="ieee")
    else:
        pv = tl.dot(p.to(vb.dtype), vb)
    acc = acc * alpha[:, None] + pv
    # the buffers rotate: block b+1 is next
    return k_next, v_next, t1, t2, page2, m_new, l_i, acc, bad, v_any


@triton.jit
def _poison_bad_v(acc, V, NodePageIndices, page_base, h, kv0, hi, lo, lim, page_size,
                  stride_vp, stride_vs, stride_vh, offs_d, BLOCK_N: tl.constexpr,
                  MATH_FP32: tl.constexpr, IEEE_DOT: tl.constexpr, WINDOW: tl.constexpr,
                  KV_FP8: tl.constexpr):
    """NaN policy for V (docs/errors.md): the dims of a row that sees a token whose V is NaN/Inf become
    NaN, those of other rows never do. hits[m, d] counts the visible tokens with a bad V[., d]."""
    t = kv0 + tl.arange(0, BLOCK_N)
    start = kv0
    while start < hi:
        t_ok = t < hi
        page = tl.load(NodePageIndices + page_base + t // page_size, mask=t_ok, other=0).to(tl.int64)
        vb = tl.load(V + (page * stride_vp + (t % page_size) * stride_vs + h * stride_vh)[:, None]
                     + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        if KV_FP8:  # exact for both fp8 formats (and the interpreter keeps e5m2's NaN/Inf this way)
            vb = vb.to(tl.float16)
        if MATH_FP32:
            vb = vb.to(tl.float32)
        v_bad = (vb - vb) != 0.0
        seen_t = (t[None, :] < lim[:, None]) & t_ok[None, :]
        if WINDOW:
            seen_t = seen_t & (t[None, :] >= lo[:, None])
        if IEEE_DOT:
            hits = tl.dot(seen_t.to(tl.float32), v_bad.to(tl.float32), input_precision="ieee")
        else:
            hits = tl.dot(seen_t.to(tl.float16), v_bad.to(tl.float16))
        acc = tl.where(hits > 0.0, float("nan"), acc)
        t += BLOCK_N
        start += BLOCK_N
    return acc


# runtime ints the JIT must not specialize on (value 1 / divisibility): one compiled variant per
# config, exactly the ones the compile report checks
# config, exactly the ones the compile report checks. Variant arguments (ReaderLo, KScale, VScale, cap2,
# scale_stride) are read only under their flag: a plain launch passes placeholders.
@triton.jit(do_not_specialize=["page_size", "group", "stride_lt", "stride_lp", "scale_stride"])
def _tree_attn_kernel(
    Q, K, V, Out, Lse, PO, PL,
    NodePageIndptr, NodePageIndices,
    ReaderRow, ReaderLimit,
    ItemNode, ItemKvStart, ItemKvLen, ItemReaderStart, ItemNumReaders, ItemPartialStart,
    RowPartialIndptr,
    ReaderLo, KScale, VScale,
    qk_scale, cap2, page_size, group, scale_stride,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_pp, stride_ph, stride_lp,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MATH_FP32: tl.constexpr, IEEE_DOT: tl.constexpr, PREFETCH: tl.constexpr,
    SOFTCAP: tl.constexpr = False, WINDOW: tl.constexpr = False, KV_FP8: tl.constexpr = False,
):
    w = tl.program_id(0)
    h = tl.program_id(1)  # KV head
    node = tl.load(ItemNode + w)
    kv0 = tl.load(ItemKvStart + w)
    kv_end = kv0 + tl.load(ItemKvLen + w)
    r0 = tl.load(ItemReaderStart + w)
    nr = tl.load(ItemNumReaders + w)  # 0 for a padding item: every mask below is then false
    p0 = tl.load(ItemPartialStart + w)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    j = offs_m // group  # reader within the item
    qh = h * group + offs_m % group  # query head of the packed row
    valid = j < nr
    row = tl.load(ReaderRow + r0 + j, mask=valid, other=0).to(tl.int64)
    lim = tl.load(ReaderLimit + r0 + j, mask=valid, other=0)  # row sees tokens [0, lim) of the node
    q = tl.load(Q + row[:, None] * stride_qt + qh[:, None] * stride_qh + offs_d[None, :],
                mask=valid[:, None], other=0.0)
    if MATH_FP32:
        q = q.to(tl.float32)

    # tokens past every reader's limit are never loaded (causal extend of the own node)
    hi = tl.minimum(kv_end, tl.max(lim, axis=0))
    if WINDOW:
        # sliding window: the row sees tokens [lo, lim) of the node (plan.reader_lo); tokens before
        # every reader's lo are never loaded
        lo = tl.load(ReaderLo + r0 + j, mask=valid, other=0)
        kv0 = tl.maximum(kv0, tl.min(tl.where(valid, lo, kv_end), axis=0))
    else:
        lo = lim  # unused
    if KV_FP8:  # one KV head per program: its scales are scalars (scale_stride 0: per tensor)
        qk_scale = qk_scale * tl.load(KScale + h * scale_stride)
    page_base = tl.load(NodePageIndptr + node)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # NaN policy (docs/errors.md): a non-finite score a row sees makes the row NaN (bad); a non-finite
    # V value makes the dims of the rows that see its token NaN (acc poisoned), never those of other rows
    bad = tl.zeros([BLOCK_M], tl.int32)
    v_any = tl.sum(bad, axis=0)  # 0-d int32 loop-carried flag (0: bad is all zeros here)
    # Software pipeline (register double buffer, PREFETCH tiles): see _kv_block. A `while` loop, not
    # `for start in range(kv0, hi, BLOCK_N)`: in the Triton interpreter a bound loaded at run time is a
    # 1-element array that Triton 3.6's range() cannot convert to an int (numpy >= 2.4).
    t = kv0 + tl.arange(0, BLOCK_N)
    t1 = t + BLOCK_N
    if PREFETCH:
        t_ok = t < hi
        page = tl.load(NodePageIndices + page_base + t // page_size, mask=t_ok, other=0).to(tl.int64)
        k = tl.load(K + (page * stride_kp + (t % page_size) * stride_ks + h * stride_kh)[:, None]
                    + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        v = tl.load(V + (page * stride_vp + (t % page_size) * stride_vs + h * stride_vh)[:, None]
                    + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        page1 = tl.load(NodePageIndices + page_base + t1 // page_size, mask=t1 < hi, other=0).to(tl.int64)
    else:
        k = 0.0
        v = 0.0
        page1 = 0
    start = kv0
    while start < hi:
        k, v, t, t1, page1, m_i, l_i, acc, bad, v_any = _kv_block(
            q, K, V, NodePageIndices, page_base, h, hi, lo, lim, qk_scale, cap2, page_size,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
            k, v, t, t1, page1, m_i, l_i, acc, bad, v_any,
            offs_d, BLOCK_N, MATH_FP32, IEEE_DOT, PREFETCH, SOFTCAP, WINDOW, KV_FP8)
        start += BLOCK_N

    if v_any > 0:  # rare: NaN/Inf in V; a second pass over V only (no Q K^T), 16-token blocks
        acc = _poison_bad_v(acc, V, NodePageIndices, page_base, h, kv0, hi, lo, lim, page_size,
                            stride_vp, stride_vs, stride_vh, offs_d, 16, MATH_FP32, IEEE_DOT, WINDOW,
                            KV_FP8)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if KV_FP8:
        out = out * tl.load(VScale + h * scale_stride)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    out = tl.where(bad[:, None] > 0, float("nan"), out)
    lse = tl.where(bad > 0, float("nan"), lse)
    # rows with exactly one partial skip the workspace and the merge
    n_part = tl.load(RowPartialIndptr + row + 1, mask=valid, other=0) - tl.load(
        RowPartialIndptr + row, mask=valid, other=0)
    direct = valid & (n_part == 1)
    to_ws = valid & (n_part != 1)
    tl.store(Out + row[:, None] * stride_ot + qh[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=direct[:, None])
    tl.store(Lse + row * stride_lt + qh, lse, mask=direct)
    slot_p = (p0 + j).to(tl.int64)
    tl.store(PO + slot_p[:, None] * stride_pp + qh[:, None] * stride_ph + offs_d[None, :], out,
             mask=to_ws[:, None])
    tl.store(PL + slot_p * stride_lp + qh, lse, mask=to_ws)


class AttnConfig(NamedTuple):
    """Compile-time parameters of one attention kernel variant (what the dispatcher picks)."""

    HEAD_DIM: int
    BLOCK_M: int
    BLOCK_N: int
    MATH_FP32: bool
    IEEE_DOT: bool
    PREFETCH: bool
    num_warps: int
    num_stages: int
    SOFTCAP: bool = False
    WINDOW: bool = False
    KV_FP8: bool = False


def attn_config(head_dim: int, dtype: torch.dtype, group: int, max_item_readers: int,
                device: torch.device, variant: Variant = PLAIN) -> AttnConfig:
    """The dispatcher: pick the kernel variant for a call (``variant``: the attention variant's
    compile-time flags; sinks are the op's, not the kernel's)."""
    if group > MAX_BLOCK_M[head_dim]:
        raise MetadataError(
            f"k_cache: GQA group num_qo_heads / num_kv_heads = {group} exceeds the Triton kernel's row "
            f"tile {MAX_BLOCK_M[head_dim]} for head_dim {head_dim}"
        )
    rows = max(1, max_item_readers) * group
    block_m = max(16, next_pow2(rows))
    if block_m > MAX_BLOCK_M[head_dim]:
        raise MetadataError(
            f"plan.rows_per_tile: {max_item_readers} readers x GQA group {group} = {rows} packed rows "
            f"exceeds the kernel's row tile {MAX_BLOCK_M[head_dim]} for head_dim {head_dim}; plan with "
            f"rows_per_tile <= {max(1, MAX_BLOCK_M[head_dim] // group)}"
        )
    flags = dict(SOFTCAP=variant.softcap is not None, WINDOW=variant.window is not None,
                 KV_FP8=variant.fp8)
    block_n, num_warps, prefetch = TILES[(head_dim, block_m)]
    for name, flag in (("softcap", "SOFTCAP"), ("window", "WINDOW"), ("fp8", "KV_FP8")):
        if flags[flag] and (head_dim, block_m, name) in VARIANT_TILES:  # the variant's own tile
            block_n, num_warps, prefetch = VARIANT_TILES[(head_dim, block_m, name)]
    return AttnConfig(head_dim, block_m, block_n, interpret_math_fp32(dtype, device),
                      dtype == torch.float32, prefetch, num_warps, 1, **flags)


def gpu_attn_configs() -> list[tuple[torch.dtype, AttnConfig]]:
    """Every (dtype, variant) the dispatcher can choose on a GPU for fp16/bf16 (the GQA group, page size
    and lse strides are runtime arguments the JIT does not specialize on)."""
    out = []
    for d, bm in TILES:
        for dtype in (torch.float16, torch.bfloat16):
            out.append((dtype, attn_config(d, dtype, 1, bm, torch.device("cuda"))))
    return out


# The variant configurations the compile report checks: each variant on a few representative row tiles
# of every head_dim (small decode tile, the Hopper warp-group tile, the largest), not the full cross
# product; fp8 with both fp8 formats. (variant name, head_dim, BLOCK_M, q dtype, cache dtype)
VARIANT_REPORT_TILES = [
    (name, d, bm, torch.bfloat16 if name == "softcap" else torch.float16)
    for name in ("softcap", "window", "fp8")
    for d, bm in ((64, 16), (64, 64), (64, 256), (128, 128), (256, 16))
]


def gpu_variant_attn_configs() -> list[tuple[str, torch.dtype, torch.dtype, AttnConfig]]:
    """(variant name, q dtype, cache dtype, config) of :data:`VARIANT_REPORT_TILES` (fp8: e4m3 and
    e5m2 caches, per-KV-head scales being a runtime stride)."""
    cuda = torch.device("cuda")
    one = torch.ones(1)
    out = []
    for name, d, bm, dtype in VARIANT_REPORT_TILES:
        v = {"softcap": Variant(softcap=1.0), "window": Variant(window=1),
             "fp8": Variant(k_scale=one, v_scale=one)}[name]
        cfg = attn_config(d, dtype, 1, bm, cuda, v)
        # e5m2 only differs in the conversion: two tiles (the wgmma / tcgen05 one and head_dim 256)
        caches = (dtype,) if name != "fp8" else FP8_DTYPES[:2 if (d, bm) in ((64, 64), (256, 16)) else 1]
        out += [(name, dtype, c, cfg) for c in caches]
    return out


def _check(q: Tensor, k_cache: Tensor) -> None:
    if k_cache.dtype in FP8_DTYPES and q.dtype not in (torch.float16, torch.bfloat16):
        raise MetadataError(f"q: an fp8 KV cache takes float16 or bfloat16 queries, got {q.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise MetadataError(f"q: backend 'triton' supports float16, bfloat16 and float32, got {q.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise MetadataError(f"q: backend 'triton' supports head_dim in {HEAD_DIMS}, got {q.shape[-1]}")
    if k_cache.stride(-1) != 1:
        raise MetadataError("k_cache: expected a unit stride in head_dim")


def row_positions(meta: ForestMetadata, total_q: int) -> Tensor:
    """int32 [total_q]: each query row's position (its own token's: the last ``q_len`` tokens of its
    group's own node, positions from :meth:`ForestMetadata.positions`). Vectorized, no host sync."""
    dev = meta.device
    if total_q == 0 or meta.vis_nodes.numel() == 0:
        return torch.zeros(total_q, dtype=torch.int32, device=dev)
    pos = meta.positions().long()
    qo = meta.qo_indptr.long()
    q_len = qo[1:] - qo[:-1]
    own = meta.vis_nodes.long()[(meta.vis_indptr[1:].long() - 1).clamp(min=0)]
    base = pos[own] + meta.node_len.long()[own] - q_len - qo[:-1]  # + row index = the row's position
    rpos = torch.repeat_interleave(base, q_len, output_size=total_q) + torch.arange(total_q, device=dev)
    return rpos.to(torch.int32)


def plan_reader_lo(plan: TreePlan, meta: ForestMetadata, window: int, total_q: int) -> Tensor:
    """int32 [R]: the first token of its node each reader of ``plan`` sees under ``window``.

    ``plan.reader_lo`` when the plan was built for this window (docs/plan.md). A plan built without one
    (or for a larger window: it dropped nothing this one needs) is computed here from ``meta``'s
    positions: ``max(0, pos(row) - node_pos[n] - window + 1)``, each reader's node forward-filled from
    its items (a node's readers are contiguous and its first reader starts an item). A plan built for a
    smaller window dropped readers and chunks this call needs: MetadataError.
    """
    built = int(getattr(plan, "window", 0) or 0)
    if built == window:
        return plan.reader_lo
    if built and built < window:
        raise MetadataError(f"plan.window: the plan was built for window {built}, which drops keys the "
                            f"call's window {window} sees; plan with window={window} (or without one)")
    r = plan.reader_row.numel()
    dev = plan.reader_row.device
    if r == 0:
        return torch.zeros(0, dtype=torch.int32, device=dev)
    marker = torch.full((r,), -1, dtype=torch.int64, device=dev)
    real = torch.where(plan.item_num_readers > 0, plan.item_node, -1).long()
    marker.scatter_reduce_(0, plan.item_reader_start.long().clamp(0, r - 1), real, "amax")
    ar = torch.arange(r, device=dev)
    last = torch.cummax(torch.where(marker >= 0, ar, 0), 0).values
    node = marker[last].clamp(min=0)
    rpos = row_positions(meta, total_q).long()
    lo = rpos[plan.reader_row.long()] - meta.positions().long()[node] - window + 1
    return lo.clamp(min=0).to(torch.int32)


def _scale_stride(k_scale: Tensor, hk: int) -> int:
    return 1 if k_scale.numel() == hk and hk > 1 else 0


def run_plan(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata, sm_scale: float,
             plan: TreePlan, variant: Variant = PLAIN) -> tuple[Tensor, Tensor]:
    """Launch attention (+ merge) for ``plan``. Returns out [total_q, Hq, D] q.dtype, lse fp32.

    ``variant``: soft-cap, window (``meta``'s positions) and fp8 caches run in the kernel; sinks are
    added by the op (this backend does not declare them)."""
    _check(q, k_cache)
    total_q, hq, d = q.shape
    hk = k_cache.shape[2]
    group = hq // hk
    q = q if q.stride(-1) == 1 else q.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    cfg = attn_config(d, q.dtype, group, plan.max_item_readers, q.device, variant)
    out = torch.empty(total_q, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(total_q, hq, dtype=torch.float32, device=q.device)
    cap = plan.partial_capacity
    po = torch.empty(cap, hq, d, dtype=torch.float32, device=q.device)
    pl = torch.empty(cap, hq, dtype=torch.float32, device=q.device)
    if POISON:
        for t in (out, lse, po, pl):
            t.fill_(float("nan"))
    n_items = plan.item_node.shape[0]
    if n_items and total_q:
        qk_scale, cap2 = float(sm_scale) * LOG2E, 0.0
        if cfg.SOFTCAP:  # the kernel computes cap2 * tanh(x) as cap2 - 2 cap2 / (exp2(2 log2(e) x) + 1)
            qk_scale, cap2 = 2.0 * LOG2E * float(sm_scale) / variant.softcap, variant.softcap * LOG2E
        # placeholders for the arguments of variants that are off (never read)
        reader_lo = plan.reader_limit
        k_scale = v_scale = lse
        scale_stride = 0
        if cfg.WINDOW:
            reader_lo = plan_reader_lo(plan, meta, variant.window, total_q)
        if cfg.KV_FP8:
            k_scale, v_scale = variant.k_scale.contiguous(), variant.v_scale.contiguous()
            if k_scale.numel() != v_scale.numel():  # one stride for both: per-head for both
                k_scale, v_scale = k_scale.expand(hk).contiguous(), v_scale.expand(hk).contiguous()
            scale_stride = _scale_stride(k_scale, hk)
        launch(_tree_attn_kernel, (n_items, hk), q.device,
            q, k_cache, v_cache, out, lse, po, pl,
            meta.node_page_indptr, meta.node_page_indices,
            plan.reader_row, plan.reader_limit,
            plan.item_node, plan.item_kv_start, plan.item_kv_len, plan.item_reader_start,
            plan.item_num_readers, plan.item_partial_start, plan.row_partial_indptr,
            reader_lo, k_scale, v_scale,
            qk_scale, cap2, meta.page_size, group, scale_stride,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), lse.stride(0), po.stride(0), po.stride(1), pl.stride(0),
            HEAD_DIM=cfg.HEAD_DIM, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
            MATH_FP32=cfg.MATH_FP32, IEEE_DOT=cfg.IEEE_DOT, PREFETCH=cfg.PREFETCH, SOFTCAP=cfg.SOFTCAP,
            WINDOW=cfg.WINDOW, KV_FP8=cfg.KV_FP8, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if plan.merge_rows.shape[0] and total_q:
        launch_merge(po, pl, plan.merge_rows, plan.row_partial_indptr, plan.row_partial_indices,
                     out, lse)
    return out, lse


def tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata, sm_scale: float,
                   plan: TreePlan | None = None, variant: Variant = PLAIN) -> tuple[Tensor, Tensor]:
    """q [total_q, Hq, D] fp16/bf16/fp32; caches [num_pages, page_size, Hk, D]; D in 64/128/256 (fp8
    caches with fp16/bf16 q and ``variant.k_scale`` / ``v_scale``).

    Plans the step unless ``plan`` (from :func:`plan_tree_attention` for the same metadata and head
    counts) is given: tiny nodes absorbed, then planned (:func:`cached_run_plan`), memoised on the
    metadata tensors, so the layers of one step plan once. Returns out [total_q, Hq, D] in q.dtype
    and lse [total_q, Hq] float32. ``variant``: :data:`tree_attention.variants`.
    """
    if plan is None:
        meta, plan = default_plan(q, k_cache, meta, variant)
    return run_plan(q, k_cache, v_cache, meta, sm_scale, plan, variant)


def default_plan(q: Tensor, k_cache: Tensor, meta: ForestMetadata,
                 variant: Variant = PLAIN) -> tuple[ForestMetadata, TreePlan]:
    """The forward's default (run metadata, plan): :func:`cached_run_plan` with the kernel's row tile.
    With a window the plan holds it (``reader_lo``; chunks outside every reader's window are not
    planned) and nothing is absorbed (``run_meta`` is ``meta``)."""
    _check(q, k_cache)
    return cached_run_plan(meta, q.shape[1], k_cache.shape[2], head_dim=q.shape[-1],
                           kv_elem_size=k_cache.element_size(), window=variant.window)


tree_attention.supports_plan = True  # the op passes plan= to this backend
# the attention variants the kernel runs (multiverse_kernels/variants.py); sinks are the op's epilogue
tree_attention.variants = frozenset({"softcap", "window", "fp8"})
