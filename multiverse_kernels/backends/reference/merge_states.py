"""Reference log-sum-exp merge of partial attention states."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_states(v: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """v [N, S, H, D] partial outputs, s [N, S, H] their lse (natural log, float32/float64).

    Each partial is softmax-normalised over its own keys with denominator exp(s). The merge is
    ``lse = logsumexp_i s_i`` and ``out = sum_i exp(s_i - lse) * v_i``. States with s = -inf carry
    nothing; a row whose states are all -inf gets out = 0, lse = -inf. Returns (out [N, H, D] v.dtype,
    lse [N, H] float32).
    """
    acc = torch.float64 if v.dtype == torch.float64 or s.dtype == torch.float64 else torch.float32
    s = s.to(acc)
    m = s.amax(1)  # [N, H]
    seen = torch.isfinite(m)
    m = torch.where(seen, m, torch.zeros_like(m))
    w = torch.exp(s - m[:, None])  # exp(-inf) = 0 for empty states
    den = w.sum(1)
    out = torch.einsum("nsh,nshd->nhd", w / torch.where(seen, den, torch.ones_like(den))[:, None],
                       v.to(acc))
    lse = torch.where(seen, m + den.log(), torch.full_like(m, float("-inf")))
    return out.to(v.dtype), lse.float()
