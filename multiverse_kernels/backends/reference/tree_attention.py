"""Reference tree attention: the specification. Plain PyTorch, any device, float64-capable.

One group at a time: gather the K/V of every listed node through the page table, build the group's
(q_len x keys) mask from docs/design.md §2, and run a masked softmax. Slow on purpose; obviously right.

Non-finite inputs follow the NaN policy of docs/errors.md: a non-finite value in the q row or in a K
token the row sees makes that (row, head) NaN (out and lse); a non-finite V value makes the output
dims it reaches through a positive weight NaN; nothing crosses the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...metadata import ForestMetadata


def group_keys(meta: ForestMetadata, g: int, vis: list[int], q_len: int) -> tuple[Tensor, Tensor]:
    """Key slots and visibility mask of group ``g``.

    Returns ``slots`` int64 [K] (flat cache slots of every token of every listed node, in list order)
    and ``mask`` bool [q_len, K] (True where row i may attend key k).
    """
    own = vis[-1]
    own_len = int(meta.node_len[own])
    full = meta.own_full is not None and bool(meta.own_full[g])
    slots, masks = [], []
    rows = torch.arange(q_len, device=meta.device)
    for n in vis:
        s = meta.node_token_slots(n)
        if n == own:
            j = torch.arange(s.numel(), device=meta.device)
            if full:
                m = torch.ones(q_len, s.numel(), dtype=torch.bool, device=meta.device)
            else:
                # row i sees own tokens 0 .. own_len - q_len + i
                m = j[None, :] <= (own_len - q_len + rows)[:, None]
        else:
            m = torch.ones(q_len, s.numel(), dtype=torch.bool, device=meta.device)
        slots.append(s)
        masks.append(m)
    return torch.cat(slots), torch.cat(masks, dim=1)


def tree_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta: ForestMetadata,
    sm_scale: float,
) -> tuple[Tensor, Tensor]:
    """q [total_q, Hq, D]; k/v_cache [num_pages, page_size, Hk, D].

    Returns out [total_q, Hq, D] (q.dtype) and lse [total_q, Hq] float32 (natural log, sm_scale
    included). Math runs in float64 for float64 inputs and float32 otherwise.
    """
    total_q, hq, d = q.shape
    hk = k_cache.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k_cache.reshape(-1, hk, d)
    vf = v_cache.reshape(-1, hk, v_cache.shape[-1])
    out = torch.zeros(total_q, hq, v_cache.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((total_q, hq), float("-inf"), dtype=acc, device=q.device)
    qo = meta.qo_indptr.tolist()
    vi = meta.vis_indptr.tolist()
    vis_all = meta.vis_nodes.tolist()
    for g in range(meta.num_groups):
        q0, q1 = qo[g], qo[g + 1]
        if q1 == q0:
            continue
        slots, mask = group_keys(meta, g, vis_all[vi[g]:vi[g + 1]], q1 - q0)
        if slots.numel() == 0:
            continue
        k = kf[slots].to(acc).repeat_interleave(hq // hk, dim=1)  # [K, Hq, D]
        v = vf[slots].to(acc).repeat_interleave(hq // hk, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].to(acc), k) * sm_scale
        # NaN policy (docs/errors.md): a non-finite score the row sees (from a non-finite q row or K
        # token) makes the row NaN; what the row does not see never reaches it.
        bad = (~torch.isfinite(s) & mask[None]).any(-1, keepdim=True)  # [Hq, q, 1]
        s = s.masked_fill(~mask[None] | ~torch.isfinite(s), float("-inf"))
        m = s.amax(-1, keepdim=True)
        seen = torch.isfinite(m)
        m = torch.where(seen, m, torch.zeros_like(m))
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        p = p / torch.where(seen, den, torch.ones_like(den))
        # non-finite V values reach exactly the (row, dim) pairs whose row sees their token (whatever
        # its weight); 0 * NaN must not leak them into rows that cannot see the token
        v_bad = ~torch.isfinite(v)
        o = torch.einsum("hqk,khd->qhd", p, torch.where(v_bad, torch.zeros_like(v), v))
        if bool(v_bad.any()):
            hit = torch.einsum("qk,khd->qhd", mask.to(acc), v_bad.to(acc)) > 0
            o = o.masked_fill(hit, float("nan"))
        lse_g = torch.where(seen, m + den.log(), m.new_full((), float("-inf")))
        o = o.masked_fill(bad[..., 0].T[..., None], float("nan"))
        lse_g = lse_g.masked_fill(bad, float("nan"))
        out[q0:q1] = o
        lse[q0:q1] = lse_g[..., 0].T
    return out.to(q.dtype), lse.float()
