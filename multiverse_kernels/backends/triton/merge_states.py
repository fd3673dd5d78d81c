"""Triton log-sum-exp merge of partial attention states.

One program per (row to merge, head) walks the row's partial slots with a running max (online merge,
fp32). Used by tree attention over a plan (rows with != 1 partials) and by the ``merge_states`` op.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...metadata import MetadataError
from ._common import launch

# Tests set this: fill the outputs with NaN before each launch so unwritten elements fail.
POISON = False


# runtime ints the JIT must not specialize on (value 1 / divisibility): one compiled variant per
# config, exactly the ones the compile report checks
@triton.jit(do_not_specialize=["stride_lp", "stride_lt"])
def _merge_kernel(
    PO, PL, Out, Lse, MergeRows, RowIndptr, RowIndices,
    stride_pp, stride_ph, stride_lp, stride_ot, stride_oh, stride_lt,
    HEAD_DIM: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.load(MergeRows + i)
    ok = r >= 0  # -1 marks a padding entry (plan capacity)
    offs_d = tl.arange(0, HEAD_DIM)
    # the store masks as blocks compared directly (Triton 3.9's interpreter gives `scalar & block` int32)
    ok_d = (tl.zeros([HEAD_DIM], tl.int32) + r) >= 0
    ok_1 = (tl.zeros([1], tl.int32) + r) >= 0
    r = tl.maximum(r, 0).to(tl.int64)
    start = tl.load(RowIndptr + r)
    end = tl.where(ok, tl.load(RowIndptr + r + 1), start)
    m = tl.full([1], float("-inf"), tl.float32)
    den = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    bad = tl.zeros([1], tl.int32)  # NaN policy (docs/errors.md): a NaN / +Inf lse makes the row NaN
    # a `while` loop: Triton 3.6's interpreter cannot range() over bounds loaded at run time
    p = start
    while p < end:
        slot = tl.load(RowIndices + p).to(tl.int64)
        s = tl.load(PL + slot * stride_lp + h + tl.zeros([1], tl.int32))
        v = tl.load(PO + slot * stride_pp + h * stride_ph + offs_d).to(tl.float32)
        s_bad = (s != s) | (s == float("inf"))
        bad = tl.maximum(bad, s_bad.to(tl.int32))
        s = tl.where(s_bad, float("-inf"), s)
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all states so far empty
        a = tl.exp(m - m_safe)
        b = tl.exp(s - m_safe)
        acc = acc * a + tl.where(s > float("-inf"), b * v, 0.0)  # an empty state's v is never read
        den = den * a + b
        m = m_new
        p += 1
    seen = den > 0.0
    out = acc / tl.where(seen, den, 1.0)
    lse = tl.where(seen, m + tl.log(tl.where(seen, den, 1.0)), float("-inf"))
    out = tl.where(bad > 0, float("nan"), out)
    lse = tl.where(bad > 0, float("nan"), lse)
    tl.store(Out + r * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=ok_d)
    tl.store(Lse + r * stride_lt + h + tl.zeros([1], tl.int32), lse, mask=ok_1)


class MergeConfig(NamedTuple):
    HEAD_DIM: int
    num_warps: int


def merge_config(head_dim: int) -> MergeConfig:
    return MergeConfig(head_dim, 1 if head_dim <= 64 else 2)


def launch_merge(po: Tensor, pl: Tensor, merge_rows: Tensor, row_indptr: Tensor, row_indices: Tensor,
                 out: Tensor, lse: Tensor) -> None:
    """Merge the partial slots of each row in ``merge_rows`` into ``out``/``lse`` (in place).

    po float32 [S, H, D] (or any float dtype), pl float32 [S, H]; out [rows, H, D], lse fp32 [rows, H].
    """
    d = po.shape[-1]
    cfg = merge_config(d)
    launch(_merge_kernel, (merge_rows.shape[0], po.shape[1]), out.device,
        po, pl, out, lse, merge_rows, row_indptr, row_indices,
        po.stride(0), po.stride(1), pl.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        HEAD_DIM=cfg.HEAD_DIM, num_warps=cfg.num_warps,
    )


def merge_states(v: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """v [N, S, H, D] fp16/bf16/fp32 partial outputs, s [N, S, H] float32 lse -> (out [N, H, D] v.dtype,
    lse [N, H] float32). D must be a power of two >= 16."""
    if v.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise MetadataError(f"v: backend 'triton' supports float16, bfloat16 and float32, got {v.dtype}")
    n, ns, h, d = v.shape
    if d < 16 or d & (d - 1):
        raise MetadataError(f"v: backend 'triton' needs head_dim a power of two >= 16, got {d}")
    s = s.to(torch.float32)
    po = v.reshape(n * ns, h, d)
    pl = s.reshape(n * ns, h)
    if po.stride(-1) != 1:
        po = po.contiguous()
    out = torch.empty(n, h, d, dtype=v.dtype, device=v.device)
    lse = torch.empty(n, h, dtype=torch.float32, device=v.device)
    if POISON:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if n == 0 or h == 0:
        return out, lse
    dev = v.device
    rows = torch.arange(n, dtype=torch.int32, device=dev)
    indptr = torch.arange(0, n * ns + 1, max(ns, 1), dtype=torch.int32, device=dev)[: n + 1]
    if ns == 0:
        indptr = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    indices = torch.arange(n * ns, dtype=torch.int32, device=dev)
    launch_merge(po, pl, rows, indptr, indices, out, lse)
    return out, lse
