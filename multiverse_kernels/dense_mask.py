"""Dense L x L visibility for small cases: to check the kernels, and as the dense-mask SDPA peer.

Keys are every token of every node, in node order (node 0's tokens, then node 1's, ...). This is the
O(L^2) object the library exists to avoid; use it for tests and comparisons only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .metadata import ForestMetadata

__all__ = ["dense_mask", "key_slots", "dense_attention"]


def key_slots(meta: ForestMetadata) -> Tensor:
    """int64 [T]: flat cache slot of every token of every node, in node order."""
    lens = meta.node_len.long()
    T = int(lens.sum())
    node = torch.repeat_interleave(torch.arange(meta.num_nodes, device=meta.device), lens)
    start = torch.cumsum(lens, 0) - lens
    j = torch.arange(T, device=meta.device) - start[node]
    page = meta.node_page_indices.long()[meta.node_page_indptr.long()[node] + j // meta.page_size]
    return page * meta.page_size + j % meta.page_size


def dense_mask(meta: ForestMetadata) -> Tensor:
    """bool [total_q, T]: True where query row r may attend key t (keys as in :func:`key_slots`).
    Validates ``meta`` first (a checking tool must not build a mask from broken metadata)."""
    meta.validate()
    lens = meta.node_len.tolist()
    off = [0]
    for n in lens:
        off.append(off[-1] + n)
    mask = torch.zeros(meta.total_q, off[-1], dtype=torch.bool, device=meta.device)
    qo, vi, vis = meta.qo_indptr.tolist(), meta.vis_indptr.tolist(), meta.vis_nodes.tolist()
    for g in range(meta.num_groups):
        q0, q1 = qo[g], qo[g + 1]
        if q1 == q0:
            continue
        nodes = vis[vi[g]:vi[g + 1]]
        for n in nodes[:-1]:
            mask[q0:q1, off[n]:off[n + 1]] = True
        own = nodes[-1]
        full = meta.own_full is not None and bool(meta.own_full[g])
        qlen, olen = q1 - q0, lens[own]
        j = torch.arange(olen, device=meta.device)
        i = torch.arange(qlen, device=meta.device)
        own_mask = torch.ones(qlen, olen, dtype=torch.bool, device=meta.device) if full else (
            j[None, :] <= (olen - qlen + i)[:, None])
        mask[q0:q1, off[own]:off[own + 1]] |= own_mask
    return mask


def dense_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata,
                    sm_scale: float | None = None, mask: Tensor | None = None,
                    return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Tree attention through ``F.scaled_dot_product_attention`` with the dense mask.

    q [total_q, Hq, D]; caches [num_pages, page_size, Hk, D]. Returns out [total_q, Hq, D] (rows that
    see nothing are 0) and, if asked, lse [total_q, Hq] float32 computed from the masked scores.
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    if mask is None:
        mask = dense_mask(meta)
    slots = key_slots(meta)
    hq, hk = q.shape[1], k_cache.shape[2]
    k = k_cache.reshape(-1, hk, k_cache.shape[-1])[slots].transpose(0, 1)  # [Hk, T, D]
    v = v_cache.reshape(-1, hk, v_cache.shape[-1])[slots].transpose(0, 1)
    qt = q.transpose(0, 1)  # [Hq, total_q, D]
    out = F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, scale=sm_scale,
                                         enable_gqa=hq != hk).transpose(0, 1)
    empty = ~mask.any(-1)
    out = out.masked_fill(empty[:, None, None], 0)
    if not return_lse:
        return out
    kk = k.repeat_interleave(hq // hk, dim=0)
    s = torch.einsum("hqd,hkd->hqk", qt.to(torch.float64), kk.to(torch.float64)) * sm_scale
    lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1).T.float()
    return out, lse
