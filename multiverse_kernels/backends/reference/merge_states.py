"""Reference log-sum-exp merge of partial attention states."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_states(v: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """v [N, S, H, D] partial outputs, s [N, S, H] their lse (natural log, float32/float64).

    Each partial is softmax-normalised over its own keys with denominator exp(s). The merge is
    ``lse = logsumexp_i s_i`` and ``out = sum_i exp(s_i - lse) * v_i``. States with s = -inf carry
    nothing (their values are never read); a row whose states are all -inf (or that has no states)
    gets out = 0, lse = -inf; a NaN or +inf lse makes the row NaN (docs/errors.md).
    Returns (out [N, H, D] v.dtype, lse [N, H] float32).
    """
    acc = torch.float64 if v.dtype == torch.float64 or s.dtype == torch.float64 else torch.float32
    N, S, H, D = v.shape
    if S == 0:  # no states: nothing seen
        return (torch.zeros(N, H, D, dtype=v.dtype, device=v.device),
                torch.full((N, H), float("-inf"), dtype=torch.float32, device=v.device))
    s = s.to(acc)
    bad = (torch.isnan(s) | (s == float("inf"))).any(1)  # NaN policy: a NaN / +Inf lse -> row NaN
    s = s.masked_fill(torch.isnan(s) | (s == float("inf")), float("-inf"))
    m = s.amax(1)  # [N, H]
    seen = torch.isfinite(m)
    m = torch.where(seen, m, torch.zeros_like(m))
    w = torch.exp(s - m[:, None])  # exp(-inf) = 0 for empty states
    den = w.sum(1)
    vv = v.to(acc)
    # an empty state's values are never read (0 * NaN would leak them)
    vv = torch.where((s > float("-inf"))[..., None], vv, torch.zeros_like(vv))
    out = torch.einsum("nsh,nshd->nhd", w / torch.where(seen, den, torch.ones_like(den))[:, None], vv)
    lse = torch.where(seen, m + den.log(), torch.full_like(m, float("-inf")))
    out = out.masked_fill(bad[..., None], float("nan"))
    lse = lse.masked_fill(bad, float("nan"))
    return out.to(v.dtype), lse.float()
