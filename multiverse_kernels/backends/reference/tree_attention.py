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
from ...variants import PLAIN, Variant


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


def load_kv(cache: Tensor, slots: Tensor, scale: Tensor | None, acc: torch.dtype) -> Tensor:
    """The tokens ``slots`` of ``cache`` [pages, page_size, Hk, D] as [len(slots), Hk, D] in ``acc``; an
    fp8 cache dequantized: times its scale ([1]: per tensor, [Hk]: per KV head)."""
    hk = cache.shape[2]
    x = cache.reshape(-1, hk, cache.shape[-1])[slots].to(acc)
    return x if scale is None else x * scale.to(acc).reshape(-1, 1).expand(hk, 1)


def key_positions(meta: ForestMetadata, nodes: list[int], pos: list[int]) -> Tensor:
    """int64 [K]: the position of every token of ``nodes`` (in list order): node_pos[n] + j."""
    lens = meta.node_len.tolist()
    parts = [pos[n] + torch.arange(lens[n], device=meta.device) for n in nodes]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=meta.device)


def row_positions(meta: ForestMetadata, own: int, q_len: int, pos: list[int]) -> Tensor:
    """int64 [q_len]: a group's rows' positions (its own node's last q_len tokens)."""
    n = int(meta.node_len[own])
    return pos[own] + n - q_len + torch.arange(q_len, device=meta.device)


def tree_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta: ForestMetadata,
    sm_scale: float,
    variant: Variant = PLAIN,
) -> tuple[Tensor, Tensor]:
    """q [total_q, Hq, D]; k/v_cache [num_pages, page_size, Hk, D].

    Returns out [total_q, Hq, D] (q.dtype) and lse [total_q, Hq] float32 (natural log, sm_scale
    included; with sinks the log of the whole denominator, sink term included). Math runs in float64
    for float64 inputs and float32 otherwise. ``variant``: window / softcap / sinks / fp8 caches
    (multiverse_kernels/variants.py).
    """
    total_q, hq, d = q.shape
    hk = k_cache.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos = meta.positions().tolist() if variant.window is not None else []
    sinks = variant.sinks.to(acc) if variant.sinks is not None else None
    out = torch.zeros(total_q, hq, v_cache.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((total_q, hq), float("-inf"), dtype=acc, device=q.device)
    qo = meta.qo_indptr.tolist()
    vi = meta.vis_indptr.tolist()
    vis_all = meta.vis_nodes.tolist()
    for g in range(meta.num_groups):
        q0, q1 = qo[g], qo[g + 1]
        if q1 == q0:
            continue
        nodes = vis_all[vi[g]:vi[g + 1]]
        slots, mask = group_keys(meta, g, nodes, q1 - q0)
        if variant.window is not None:  # pos(row) - pos(key) < window
            rpos = row_positions(meta, nodes[-1], q1 - q0, pos)
            dist = rpos[:, None] - key_positions(meta, nodes, pos)[None]
            mask = mask & (dist < variant.window)
        if slots.numel() == 0 or not bool(mask.any()):
            if sinks is not None:  # a row that sees no key: out 0, lse = its head's sink
                lse[q0:q1] = sinks[None, :]
            continue
        k = load_kv(k_cache, slots, variant.k_scale, acc).repeat_interleave(hq // hk, dim=1)  # [K, Hq, D]
        v = load_kv(v_cache, slots, variant.v_scale, acc).repeat_interleave(hq // hk, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].to(acc), k) * sm_scale
        # NaN policy (docs/errors.md): a non-finite score the row sees (from a non-finite q row or K
        # token) makes the row NaN; what the row does not see never reaches it.
        bad = (~torch.isfinite(s) & mask[None]).any(-1, keepdim=True)  # [Hq, q, 1]
        if variant.softcap is not None:  # Gemma 2: s = c * tanh(s / c), after the scale
            s = variant.softcap * torch.tanh(s / variant.softcap)
        s = s.masked_fill(~mask[None] | ~torch.isfinite(s), float("-inf"))
        m = s.amax(-1, keepdim=True)
        if sinks is not None:  # the sink logit joins the max and the denominator (never the numerator)
            m = torch.maximum(m, sinks[:, None, None])
        seen = torch.isfinite(m)
        m = torch.where(seen, m, torch.zeros_like(m))
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        if sinks is not None:
            den = den + torch.exp(sinks[:, None, None] - m)
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
