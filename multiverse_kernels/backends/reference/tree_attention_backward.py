"""Reference backward of tree attention: FlashAttention-style recompute from the saved ``lse``.

For the rows ``r`` and visible keys ``t`` of docs/design.md §2 (scores ``s = sm_scale * q_r . k_t``)::

    P     = exp(s - lse_r)                       (the forward's softmax, recomputed)
    D_r   = sum_e dO[r, e] * O[r, e] - dlse_r    (dlse: the gradient of lse, 0 when unused)
    dV_t += sum_r P[r, t] dO_r
    dS    = P * (dO_r . v_t - D_r)
    dQ_r += sm_scale * sum_t dS[r, t] k_t
    dK_t += sm_scale * sum_r dS[r, t] q_r

(``d lse_r / d s_t = P[r, t]``, so the gradient of lse enters as ``-dlse`` in ``D``.) GQA: a KV head's
dK/dV sum over the query heads that read it.

Work goes one (group, block of ``block_q`` query rows) at a time, over each listed node in blocks of
``block_k`` tokens, so the largest temporaries are ``[num_qo_heads, block_q, block_k]``: memory is bounded
by the block sizes, never by ``q_len x visible keys`` and never ``L x L``. Blocks of the own node that a
causal row block cannot see at all are skipped. Accumulation is float32 (float64 for float64 inputs).
For float64 inputs the float32 ``lse`` of the op is first refined to float64 by one more blocked pass
(an online log-sum-exp), so float64 gradients are float64-exact. Rows that see nothing (lse = -inf)
contribute nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ...metadata import ForestMetadata
from ...variants import PLAIN, Variant

BLOCK_Q = 64
BLOCK_K = 256


def _row_blocks(meta: ForestMetadata, block_q: int, block_k: int, window: int | None = None
                ) -> Iterator[tuple[int, int, list[tuple[Tensor, Tensor | None]]]]:
    """Yield ``(r0, r1, key_blocks)``: query rows ``r0:r1`` of one group and, for them, a list of
    ``(slots int64 [m], limit)`` key blocks; ``limit`` is None (every row sees the whole block) or an
    int64 ``[r1 - r0]`` tensor: row i sees the block's key j (its position in its node) iff
    ``j < limit[i]`` — returned as the block's first position subtracted, so the test is
    ``arange(m) < limit``. Only blocks that some row of ``r0:r1`` sees are listed. With a ``window``,
    ``limit`` is a bool ``[r1 - r0, m]`` mask instead (causality and ``pos(row) - pos(key) < window``)."""
    pos = meta.positions().tolist() if window is not None else []
    qo = meta.qo_indptr.tolist()
    vi = meta.vis_indptr.tolist()
    vis_all = meta.vis_nodes.tolist()
    lens = meta.node_len.tolist()
    full_all = meta.own_full.tolist() if meta.own_full is not None else None
    for g in range(meta.num_groups):
        q0, q1 = qo[g], qo[g + 1]
        if q1 == q0:
            continue
        nodes = vis_all[vi[g]:vi[g + 1]]
        own = nodes[-1]
        full = full_all is not None and bool(full_all[g])
        q_len = q1 - q0
        slots = {n: meta.node_token_slots(n) for n in nodes if lens[n] > 0}
        for r0 in range(q0, q1, block_q):
            r1 = min(r0 + block_q, q1)
            blocks: list[tuple[Tensor, Tensor | None]] = []
            for n in nodes:
                if lens[n] == 0:
                    continue
                causal = n == own and not full
                if causal:
                    # row i (in-group index) sees own tokens j < lens[own] - q_len + i + 1
                    lim = lens[own] - q_len + 1 + torch.arange(r0 - q0, r1 - q0, device=meta.device)
                    kmax = lens[own] - q_len + (r1 - q0)  # what the block's last row sees
                else:
                    lim, kmax = None, lens[n]
                for c0 in range(0, kmax, block_k):
                    c1 = min(c0 + block_k, kmax)
                    if window is None:
                        blocks.append((slots[n][c0:c1], None if lim is None else lim - c0))
                        continue
                    j = torch.arange(c0, c1, device=meta.device)
                    msk = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool, device=meta.device)
                    if lim is not None:
                        msk &= j[None, :] < lim[:, None]
                    rpos = pos[own] + lens[own] - q_len + torch.arange(r0 - q0, r1 - q0, device=meta.device)
                    msk &= (rpos[:, None] - (pos[n] + j)[None, :]) < window
                    if bool(msk.any()):
                        blocks.append((slots[n][c0:c1], msk))
            yield r0, r1, blocks


def _mask(limit: Tensor | None, m: int, device: torch.device) -> Tensor | None:
    """bool [n, m] visibility of a causal block (None: all visible; a bool limit is the mask)."""
    if limit is None or limit.dtype == torch.bool:
        return limit
    return torch.arange(m, device=device)[None, :] < limit[:, None]


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
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``(out, lse) = tree_attention(q, k_cache, v_cache, meta, sm_scale, variant)``.

    Variants: a window masks like the forward; a soft-cap ``s = c tanh(s0 / c)`` multiplies dS by its
    derivative ``1 - (s / c)^2`` before dQ and dK; sinks need nothing here (``lse`` holds the sink term,
    so ``P`` is the forward's; their own gradient is the op's, from out and lse). fp8 caches have no
    backward.

    Args:
        grad_out: [total_q, Hq, D] (any float dtype); grad_lse: [total_q, Hq] or None.
        q, k_cache, v_cache: the forward's inputs ([total_q, Hq, D]; [num_pages, page_size, Hk, D]).
        out, lse: the forward's outputs (lse float32, natural log, ``sm_scale`` included).

    Returns:
        dq like ``q``; dk, dv like the caches (slots no row sees get 0), all in ``q.dtype``.
    """
    total_q, hq, d = q.shape
    hk = k_cache.shape[2]
    gs = hq // hk
    dev = q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k_cache.reshape(-1, hk, d)
    vf = v_cache.reshape(-1, hk, v_cache.shape[-1])
    dq = torch.zeros(total_q, hq, d, dtype=acc, device=dev)
    dk = torch.zeros(kf.shape, dtype=acc, device=dev)
    dv = torch.zeros(vf.shape, dtype=acc, device=dev)
    do = grad_out.to(acc)
    delta = (do * out.to(acc)).sum(-1)  # [total_q, Hq]
    if grad_lse is not None:
        delta = delta - torch.where(torch.isfinite(lse), grad_lse.to(acc), 0)
    lse_acc = lse.to(acc)
    refine = acc == torch.float64 and lse.dtype != torch.float64

    # per-block layout: heads as [Hk, gs], scores [Hk, gs, n, m]
    def heads_first(t: Tensor) -> Tensor:  # [n, Hq] -> [Hk, gs, n, 1]
        return t.reshape(t.shape[0], hk, gs).permute(1, 2, 0)[..., None]

    cap = variant.softcap

    def scores(qb: Tensor, kb: Tensor) -> tuple[Tensor, Tensor | None]:
        """(scores after the soft-cap, its derivative ds/ds0 or None) [Hk, gs, n, m]."""
        s = torch.einsum("nhgd,mhd->hgnm", qb, kb) * sm_scale
        if cap is None:
            return s, None
        t = torch.tanh(s / cap)
        return cap * t, 1 - t * t

    sinks = variant.sinks.to(acc) if variant.sinks is not None else None
    for r0, r1, blocks in _row_blocks(meta, block_q, block_k, variant.window):
        n = r1 - r0
        qb = q[r0:r1].to(acc).reshape(n, hk, gs, d)
        if refine:  # float64: the exact lse of these rows, blocked online log-sum-exp
            run = torch.full((hk, gs, n), float("-inf"), dtype=acc, device=dev)
            for sl, lim in blocks:
                s, _ = scores(qb, kf[sl].to(acc))
                msk = _mask(lim, sl.numel(), dev)
                if msk is not None:
                    s = s.masked_fill(~msk, float("-inf"))
                run = torch.logaddexp(run, torch.logsumexp(s, -1))
            if sinks is not None:
                run = torch.logaddexp(run, sinks.reshape(hk, gs, 1))
            lse_b = run[..., None]
        else:
            lse_b = heads_first(lse_acc[r0:r1])
        live = torch.isfinite(lse_b) & torch.isfinite(heads_first(lse_acc[r0:r1]))  # saved -inf: dead
        lse_b = torch.where(live, lse_b, 0)
        dob = do[r0:r1].reshape(n, hk, gs, -1)
        dl = heads_first(delta[r0:r1])
        dqb = torch.zeros_like(qb)
        for sl, lim in blocks:
            kb = kf[sl].to(acc)  # [m, Hk, D]
            vb = vf[sl].to(acc)
            s, dcap = scores(qb, kb)
            vis = live
            msk = _mask(lim, sl.numel(), dev)
            if msk is not None:
                vis = vis & msk
            p = torch.where(vis, torch.exp(s - lse_b), 0)  # masked / empty rows: exactly 0, no inf
            dv.index_add_(0, sl, torch.einsum("hgnm,nhge->mhe", p, dob))
            ds = p * (torch.einsum("nhge,mhe->hgnm", dob, vb) - dl)
            if dcap is not None:  # through the soft-cap: d(c tanh(s0 / c)) / ds0 = 1 - tanh^2
                ds = ds * dcap
            dqb += torch.einsum("hgnm,mhd->nhgd", ds, kb)
            dk.index_add_(0, sl, torch.einsum("hgnm,nhgd->mhd", ds, qb))
        dq[r0:r1] = dqb.reshape(n, hq, d)
    dq.mul_(sm_scale)
    dk.mul_(sm_scale)
    return (dq.to(q.dtype), dk.reshape(k_cache.shape).to(k_cache.dtype),
            dv.reshape(v_cache.shape).to(v_cache.dtype))
