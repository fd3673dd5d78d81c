"""Triton append: write new tokens' K/V into their nodes' pages (in place).

One program per new token: it looks up the token's page in its node's page table and copies the
[Hk, D] K and V rows (cast to the cache dtype) into slot ``pos % page_size`` of that page.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...metadata import MetadataError
from ._common import launch, next_pow2


# runtime ints the JIT must not specialize on (value 1 / divisibility): one compiled variant per
# config, exactly the ones the compile report checks
@triton.jit(do_not_specialize=["page_size", "num_heads"])
def _append_kernel(
    Kn, Vn, KC, VC, PageIndptr, PageIndices, TokenNode, TokenPos,
    page_size, num_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cp, stride_cs, stride_ch, stride_dp, stride_ds, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    node = tl.load(TokenNode + i)
    pos = tl.load(TokenPos + i)
    page = tl.load(PageIndices + tl.load(PageIndptr + node) + pos // page_size).to(tl.int64)
    slot = pos % page_size
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    hm = (offs_h < num_heads)[:, None]
    k = tl.load(Kn + i * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=hm)
    v = tl.load(Vn + i * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=hm)
    tl.store(KC + page * stride_cp + slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :],
             k.to(KC.dtype.element_ty), mask=hm)
    tl.store(VC + page * stride_dp + slot * stride_ds + offs_h[:, None] * stride_dh + offs_d[None, :],
             v.to(VC.dtype.element_ty), mask=hm)


class AppendConfig(NamedTuple):
    HEAD_DIM: int
    BLOCK_H: int
    num_warps: int


def append_config(num_heads: int, head_dim: int) -> AppendConfig:
    bh = next_pow2(num_heads)
    return AppendConfig(head_dim, bh, 4 if bh * head_dim >= 2048 else 2)


def append_paged_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, page_indptr: Tensor,
                    page_indices: Tensor, token_node: Tensor, token_pos: Tensor) -> None:
    """k, v [n, Hk, D] -> k_cache, v_cache [num_pages, page_size, Hk, D] in place (D a power of 2)."""
    n, hk, d = k.shape
    if d < 16 or d & (d - 1):
        raise MetadataError(f"k: backend 'triton' needs head_dim a power of two >= 16, got {d}")
    if k_cache.dtype == torch.float64 or k.dtype == torch.float64:
        raise MetadataError("k_cache: backend 'triton' does not support float64")
    if n == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise MetadataError("k_cache: expected a unit stride in head_dim")
    cfg = append_config(hk, d)
    launch(_append_kernel, (n,), k.device,
        k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos,
        k_cache.shape[1], hk,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_DIM=cfg.HEAD_DIM, BLOCK_H=cfg.BLOCK_H, num_warps=cfg.num_warps,
    )
