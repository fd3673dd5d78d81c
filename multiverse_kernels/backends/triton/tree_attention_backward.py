"""Triton backward of tree attention (FlashAttention-2 style, recompute from the saved ``lse``).

The math is the reference backward's (``backends/reference/tree_attention_backward.py``, the spec)::

    P = exp(s - lse)    D_r = rowsum(dO * O)_r - dlse_r    dS = P * (dO . v - D)
    dV_t = sum_r P dO_r    dK_t = sm_scale sum_r dS q_r    dQ_r = sm_scale sum_t dS k_t

``D`` (``delta``) is computed once per (row, head) before the kernels. Two kernels, no atomics, every
output element has one writer:

* **dK/dV** (``_bwd_dkdv_kernel``, grid = (node chunks of ``BLOCK_N`` tokens, KV heads)): a program
  loads its chunk's K and V once through the node's page table, keeps fp32 ``dK``/``dV`` accumulators
  ``[BLOCK_N, D]``, and walks *every* reader of the node (rows of any group that lists it) in tiles of
  ``BLOCK_M`` packed (reader, GQA head) rows, recomputing ``P`` from ``lse``. Reader tiles that cannot
  see the chunk (causal own node) are skipped. The readers and chunks come from the forward's plan
  format (docs/plan.md: ``reader_row``/``reader_limit`` sorted by node; one item per node chunk).
  A node owns its pages (docs/design.md §2), so the chunk's cache slots have no other writer; slots no
  row sees keep the zeros they are allocated with.
* **dQ** (``_bwd_dq_kernel``, grid = (row blocks of a query group, KV heads)): a program holds the
  fp32 ``dQ`` of ``BLOCK_M`` packed rows of one group and walks the group's visibility list node by
  node in ``BLOCK_N`` token blocks (tokens past every row's limit are not loaded).

Scores are in base 2 (scale pre-multiplied by log2 e, lse converted). Rows that see nothing
(``lse = -inf``) get ``P = 0``: zero gradients, never NaN. fp16/bf16 dots take fp16/bf16 operands
(``P``/``dS`` cast) with fp32 accumulation; fp32 uses IEEE dots; bf16 under the interpreter converts
to fp32 before any math (``interpret_math_fp32``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...metadata import ForestMetadata, MetadataError
from ...plan_cache import cached_plan
from ...tiles import DKDV_TILES, DQ_TILES, DQ_VARIANT_TILES, HEAD_DIMS
from ...variants import PLAIN, Variant
from ._common import interpret_math_fp32, launch
from .tree_attention import plan_reader_lo

LOG2E = 1.4426950408889634
# Tests set this: fill dq with NaN before the launch so unwritten rows fail.
POISON = False


# runtime ints the JIT must not specialize on (see tree_attention.py): one variant per config
# Variants (compile-time flags; off: the plain kernels' code): SOFTCAP (qk_scale then holds
# 2 log2(e) sm_scale / c: th = tanh(s0 / c) = 1 - 2 / (exp2(qk . qk_scale) + 1), P = exp2(cap2 th - lse2)
# with cap2 = c log2(e), dS times 1 - th^2), WINDOW (dK/dV: each reader sees tokens [ReaderLo, limit) of
# the node; dQ: lo = pos(row) - NodePos[node] - window + 1 from the positions). Their arguments are
# placeholders when off.
@triton.jit(do_not_specialize=["page_size", "group", "stride_lt"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    NodePageIndptr, NodePageIndices, ReaderRow, ReaderLimit,
    ItemNode, ItemKvStart, ItemKvLen, ItemReaderStart, ItemReaderEnd, ReaderLo,
    qk_scale, cap2, sm_scale, page_size, group,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MATH_FP32: tl.constexpr, IEEE_DOT: tl.constexpr, SOFTCAP: tl.constexpr = False,
    WINDOW: tl.constexpr = False,
):
    w = tl.program_id(0)
    h = tl.program_id(1)  # KV head
    node = tl.load(ItemNode + w)
    kv0 = tl.load(ItemKvStart + w)
    kv_end = kv0 + tl.load(ItemKvLen + w)
    rs = tl.load(ItemReaderStart + w)
    re = tl.load(ItemReaderEnd + w)

    offs_d = tl.arange(0, HEAD_DIM)
    t = kv0 + tl.arange(0, BLOCK_N)
    t_ok = t < kv_end
    page_base = tl.load(NodePageIndptr + node)
    page = tl.load(NodePageIndices + page_base + t // page_size, mask=t_ok, other=0).to(tl.int64)
    kv_off = page * stride_kp + (t % page_size) * stride_ks + h * stride_kh
    k = tl.load(K + kv_off[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)
    v = tl.load(V + kv_off[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)
    if MATH_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    offs_m = tl.arange(0, BLOCK_M)
    rpb = BLOCK_M // group  # readers per tile
    jm = offs_m // group
    qh = h * group + offs_m % group
    # `while` loops over bounds loaded at run time: Triton 3.6's interpreter cannot range() over them
    r0 = rs
    while r0 < re:
        j = r0 + jm
        valid = (jm < rpb) & (j < re)
        lim = tl.load(ReaderLimit + j, mask=valid, other=0)  # row sees tokens [0, lim) of the node
        if WINDOW:  # ... [lo, lim): a row whose window starts past the chunk sees none of it
            lo = tl.load(ReaderLo + j, mask=valid, other=0)
            lim = tl.where(lo < kv_end, lim, 0)
        else:
            lo = lim  # unused
        if tl.max(lim, axis=0) > kv0:  # some row of the tile sees the chunk
            row = tl.load(ReaderRow + j, mask=valid, other=0).to(tl.int64)
            q_off = row * stride_qt + qh * stride_qh
            q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            do = tl.load(DO + q_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            lse = tl.load(Lse + row * stride_lt + qh, mask=valid, other=float("-inf"))
            delta = tl.load(Delta + row * stride_lt + qh, mask=valid, other=0.0)
            if MATH_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            live = lse > float("-inf")
            lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
            if IEEE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            vis = (t[None, :] < lim[:, None]) & t_ok[None, :] & live[:, None]
            if WINDOW:
                vis = vis & (t[None, :] >= lo[:, None])
            if SOFTCAP:
                th = 1.0 - 2.0 / (tl.math.exp2(s * qk_scale) + 1.0)  # tanh(s0 / c)
                p = tl.where(vis, tl.math.exp2(cap2 * th - lse2[:, None]), 0.0)
            else:
                th = s  # unused
                p = tl.where(vis, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
            if IEEE_DOT:
                dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - th * th)
            if IEEE_DOT:
                dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
            else:
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        r0 += rpb
    dk = dk * sm_scale
    out_off = kv_off[:, None] + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=t_ok[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=t_ok[:, None])


@triton.jit(do_not_specialize=["page_size", "group", "stride_lt", "window"])
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    NodePageIndptr, NodePageIndices, NodeLen, QoIndptr, VisIndptr, VisNodes, OwnFull,
    BlockGroup, BlockRow0, NodePos,
    qk_scale, cap2, sm_scale, page_size, group, window,
    stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MATH_FP32: tl.constexpr, IEEE_DOT: tl.constexpr, SOFTCAP: tl.constexpr = False,
    WINDOW: tl.constexpr = False,
):
    b = tl.program_id(0)
    h = tl.program_id(1)  # KV head
    g = tl.load(BlockGroup + b)
    i0 = tl.load(BlockRow0 + b)  # first in-group row of the block
    q0 = tl.load(QoIndptr + g)
    q_len = tl.load(QoIndptr + g + 1) - q0
    full = tl.load(OwnFull + g) != 0
    v0 = tl.load(VisIndptr + g)
    v1 = tl.load(VisIndptr + g + 1)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rpb = BLOCK_M // group
    jm = offs_m // group
    i = i0 + jm  # in-group row index
    valid = (jm < rpb) & (i < q_len)
    row = (q0 + i).to(tl.int64)
    qh = h * group + offs_m % group
    q_off = row * stride_qt + qh * stride_qh
    q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
    do = tl.load(DO + q_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
    lse = tl.load(Lse + row * stride_lt + qh, mask=valid, other=float("-inf"))
    delta = tl.load(Delta + row * stride_lt + qh, mask=valid, other=0.0)
    if MATH_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    live = valid & (lse > float("-inf"))
    lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if WINDOW:  # the rows' positions: the last q_len tokens of the group's own node
        own = tl.load(VisNodes + v1 - 1)
        rpos = tl.load(NodePos + own) + tl.load(NodeLen + own) - q_len + i
    else:
        rpos = i  # unused
    e = v0
    while e < v1:  # a `while` loop: Triton 3.6's interpreter cannot range() over run-time bounds
        node = tl.load(VisNodes + e)
        nl = tl.load(NodeLen + node)
        sees_all = full | (e != v1 - 1)
        lim = tl.where(sees_all, nl, nl - q_len + i + 1)
        lim = tl.where(live, lim, 0)
        hi = tl.minimum(nl, tl.max(lim, axis=0))
        if WINDOW:  # row sees tokens [lo, lim); blocks before every row's lo are not loaded
            lo = rpos - window + 1 - tl.load(NodePos + node)
            lim = tl.where(lo < lim, lim, 0)
            hi = tl.minimum(nl, tl.max(lim, axis=0))
            start = tl.maximum(tl.min(tl.where(lim > 0, lo, hi), axis=0), 0)
        else:
            lo = lim  # unused
            start = 0
        page_base = tl.load(NodePageIndptr + node)
        while start < hi:
            t = start + tl.arange(0, BLOCK_N)
            t_ok = t < hi
            page = tl.load(NodePageIndices + page_base + t // page_size, mask=t_ok, other=0).to(tl.int64)
            kv_off = page * stride_kp + (t % page_size) * stride_ks + h * stride_kh
            k = tl.load(K + kv_off[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)
            v = tl.load(V + kv_off[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)
            if MATH_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
                dp = tl.dot(do, tl.trans(v))
            vis = (t[None, :] < lim[:, None]) & t_ok[None, :]
            if WINDOW:
                vis = vis & (t[None, :] >= lo[:, None])
            if SOFTCAP:
                th = 1.0 - 2.0 / (tl.math.exp2(s * qk_scale) + 1.0)  # tanh(s0 / c)
                p = tl.where(vis, tl.math.exp2(cap2 * th - lse2[:, None]), 0.0)
                ds = p * (dp - delta[:, None]) * (1.0 - th * th)
            else:
                p = tl.where(vis, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
                ds = p * (dp - delta[:, None])
            if IEEE_DOT:
                dq += tl.dot(ds, k, input_precision="ieee")
            else:
                dq += tl.dot(ds.to(k.dtype), k)
            start += BLOCK_N
        e += 1
    dq = dq * sm_scale
    tl.store(DQ + q_off[:, None] + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=valid[:, None])


class BwdConfig(NamedTuple):
    """Compile-time parameters of one backward kernel variant."""

    HEAD_DIM: int
    BLOCK_M: int
    BLOCK_N: int
    MATH_FP32: bool
    IEEE_DOT: bool
    num_warps: int
    num_stages: int
    SOFTCAP: bool = False
    WINDOW: bool = False


def bwd_configs(head_dim: int, dtype: torch.dtype, device: torch.device,
                variant: Variant = PLAIN) -> tuple[BwdConfig, BwdConfig]:
    """The (dK/dV, dQ) kernel variants for a call (``variant``: soft-cap / window flags)."""
    f32m = interpret_math_fp32(dtype, device)
    ieee = dtype == torch.float32
    flags = dict(SOFTCAP=variant.softcap is not None, WINDOW=variant.window is not None)
    n, m, w, st = DKDV_TILES[head_dim]
    dkdv = BwdConfig(head_dim, m, n, f32m, ieee, w, st, **flags)
    n, m, w, st = DQ_TILES[head_dim]
    for name in ("softcap", "window"):  # a variant's own tile where the plain one spills with it
        if getattr(variant, name) is not None and (head_dim, name) in DQ_VARIANT_TILES:
            n, m, w, st = DQ_VARIANT_TILES[(head_dim, name)]
    dq = BwdConfig(head_dim, m, n, f32m, ieee, w, st, **flags)
    return dkdv, dq


def gpu_bwd_configs() -> list[tuple[str, torch.dtype, BwdConfig]]:
    """Every (kernel, dtype, variant) the backward can launch on a GPU for fp16/bf16."""
    out = []
    for d in HEAD_DIMS:
        for dtype in (torch.float16, torch.bfloat16):
            dkdv, dq = bwd_configs(d, dtype, torch.device("cuda"))
            out += [("bwd_dkdv", dtype, dkdv), ("bwd_dq", dtype, dq)]
    return out


def gpu_variant_bwd_configs() -> list[tuple[str, str, torch.dtype, BwdConfig]]:
    """(variant name, kernel, dtype, config) for the compile report: soft-cap (bf16) and window (fp16)
    on both kernels of every head_dim."""
    out = []
    for name, dtype, v in (("softcap", torch.bfloat16, Variant(softcap=1.0)),
                           ("window", torch.float16, Variant(window=1))):
        for d in HEAD_DIMS:
            dkdv, dq = bwd_configs(d, dtype, torch.device("cuda"), v)
            out += [(name, "bwd_dkdv", dtype, dkdv), (name, "bwd_dq", dtype, dq)]
    return out


def _chunks(meta: ForestMetadata, hq: int, hk: int, d: int, chunk: int,
            window: int | None = None) -> tuple[Tensor, ...]:
    """The dK/dV work list: one entry per (node, chunk of ``chunk`` tokens) with readers, and the node's
    reader range ``[start, end)`` into the plan's ``reader_row``/``reader_limit`` (docs/plan.md), then
    each reader's first visible token (``reader_lo``; a placeholder without a window). With a window
    the plan holds it: chunks outside every reader's window get no program (their dK/dV stay 0), and a
    range may then span readers that do not see the chunk, which their ``[lo, limit)`` mask.)"""
    total_q = meta.total_q
    plan = cached_plan(meta, hq, hk, head_dim=d, chunk_tokens=chunk, rows_per_tile=max(1, total_q),
                       window=window)
    w = plan.num_items
    node = plan.item_node[:w].long()
    kv0 = plan.item_kv_start[:w].long()
    rs = plan.item_reader_start[:w].long()
    re = rs + plan.item_num_readers[:w].long()
    # items are ordered by (node, chunk, reader tile): merge the tiles of one chunk into one range
    key = node * (int(meta.node_len.max()) + 1 if w else 1) + kv0
    first = torch.ones(w, dtype=torch.bool, device=node.device)
    first[1:] = key[1:] != key[:-1]
    run = torch.cumsum(first.long(), 0) - 1
    n_runs = int(first.sum()) if w else 0
    start = torch.full((n_runs,), torch.iinfo(torch.int64).max, dtype=torch.long, device=node.device)
    end = torch.zeros(n_runs, dtype=torch.long, device=node.device)
    start.scatter_reduce_(0, run, rs, "amin")
    end.scatter_reduce_(0, run, re, "amax")
    i32 = torch.int32
    lo = plan_reader_lo(plan, meta, window, total_q) if window is not None else plan.reader_limit
    return (plan.reader_row, plan.reader_limit, node[first].to(i32), kv0[first].to(i32),
            plan.item_kv_len[:w][first], start.to(i32), end.to(i32), lo)


def _row_blocks(meta: ForestMetadata, rows_per_block: int) -> tuple[Tensor, Tensor]:
    """The dQ work list: (group, first in-group row) of every block of ``rows_per_block`` rows."""
    q_len = (meta.qo_indptr[1:] - meta.qo_indptr[:-1]).long()
    nb = (q_len + rows_per_block - 1) // rows_per_block
    total = int(nb.sum()) if nb.numel() else 0
    grp = torch.repeat_interleave(torch.arange(nb.numel(), device=nb.device), nb, output_size=total)
    first = torch.cumsum(nb, 0) - nb
    row0 = (torch.arange(total, device=nb.device) - first[grp]) * rows_per_block
    return grp.to(torch.int32), row0.to(torch.int32)


def tree_attention_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor,
    lse: Tensor,
    meta: ForestMetadata,
    sm_scale: float,
    variant: Variant = PLAIN,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``(out, lse) = tree_attention(q, k_cache, v_cache, meta, sm_scale, variant)``.

    Args: grad_out, q, out [total_q, Hq, D]; grad_lse, lse [total_q, Hq] (lse float32);
    caches [num_pages, page_size, Hk, D]; fp16/bf16/fp32, D in 64/128/256. ``variant``: soft-cap and
    window in the kernels; sinks need nothing (``lse`` holds them).
    Returns ``(dq, dk, dv)`` shaped and typed like ``q``, ``k_cache``, ``v_cache`` (unseen slots 0).
    """
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise MetadataError(f"q: backend 'triton' supports float16, bfloat16 and float32, got {q.dtype}")
    total_q, hq, d = q.shape
    if d not in HEAD_DIMS:
        raise MetadataError(f"q: backend 'triton' supports head_dim in {HEAD_DIMS}, got {d}")
    if v_cache.shape[-1] != d:
        raise MetadataError(f"v_cache: backend 'triton' needs the head_dim of q ({d}), got "
                            f"{v_cache.shape[-1]}")
    hk = k_cache.shape[2]
    group = hq // hk
    dev = q.device
    cfg_kv, cfg_q = bwd_configs(d, q.dtype, dev, variant)
    for cfg in (cfg_kv, cfg_q):
        if group > cfg.BLOCK_M:
            raise MetadataError(f"k_cache: GQA group num_qo_heads / num_kv_heads = {group} exceeds the "
                                f"Triton backward's row tile {cfg.BLOCK_M} for head_dim {d}")
    q = q.contiguous()
    k = k_cache.contiguous()
    v = v_cache.to(k.dtype).contiguous()
    do = grad_out.to(q.dtype).contiguous()
    lse = lse.float().contiguous()
    # delta = rowsum(dO * O) - dlse, once (fp32); the gradient of lse enters as in the reference
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - torch.where(torch.isfinite(lse), grad_lse.float(), 0.0)
    delta = delta.contiguous()
    dq = torch.empty_like(q)
    if POISON:
        dq.fill_(float("nan"))
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if total_q == 0:
        return dq, dk.view_as(k_cache), dv.view_as(v_cache)
    qk_scale, cap2 = float(sm_scale) * LOG2E, 0.0
    if variant.softcap is not None:  # th = tanh(s0 / c) = 1 - 2 / (exp2(2 log2(e) s0 / c) + 1)
        qk_scale, cap2 = 2.0 * LOG2E * float(sm_scale) / variant.softcap, variant.softcap * LOG2E
    common = (float(sm_scale), meta.page_size, group)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), lse.stride(0))

    chunks = _chunks(meta, hq, hk, d, cfg_kv.BLOCK_N, variant.window)
    if chunks[2].numel():
        launch(_bwd_dkdv_kernel, (chunks[2].numel(), hk), dev,
            q, k, v, do, lse, delta, dk, dv, meta.node_page_indptr, meta.node_page_indices, *chunks,
            qk_scale, cap2, *common, *strides,
            HEAD_DIM=d, BLOCK_M=cfg_kv.BLOCK_M, BLOCK_N=cfg_kv.BLOCK_N, MATH_FP32=cfg_kv.MATH_FP32,
            IEEE_DOT=cfg_kv.IEEE_DOT, SOFTCAP=cfg_kv.SOFTCAP, WINDOW=cfg_kv.WINDOW,
            num_warps=cfg_kv.num_warps, num_stages=cfg_kv.num_stages,
        )
    grp, row0 = _row_blocks(meta, cfg_q.BLOCK_M // group)
    own_full = (meta.own_full.to(torch.int32) if meta.own_full is not None
                else torch.zeros(meta.num_groups, dtype=torch.int32, device=dev))
    node_pos = meta.positions() if variant.window is not None else meta.node_len
    if grp.numel():
        launch(_bwd_dq_kernel, (grp.numel(), hk), dev,
            q, k, v, do, lse, delta, dq, meta.node_page_indptr, meta.node_page_indices, meta.node_len,
            meta.qo_indptr, meta.vis_indptr, meta.vis_nodes, own_full, grp, row0, node_pos,
            qk_scale, cap2, *common, variant.window or 0, *strides,
            HEAD_DIM=d, BLOCK_M=cfg_q.BLOCK_M, BLOCK_N=cfg_q.BLOCK_N, MATH_FP32=cfg_q.MATH_FP32,
            IEEE_DOT=cfg_q.IEEE_DOT, SOFTCAP=cfg_q.SOFTCAP, WINDOW=cfg_q.WINDOW,
            num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages,
        )
    return dq, dk.view_as(k_cache), dv.view_as(v_cache)


# the attention variants the kernels run (sinks need nothing here: lse holds them)
tree_attention_backward.variants = frozenset({"softcap", "window"})
