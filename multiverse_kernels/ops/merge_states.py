"""``merge_states``: log-sum-exp merge of partial attention states of the same rows."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import resolve
from ..metadata import MetadataError
from ._checks import FLOAT_DTYPES, check_tensor, fake_checks

__all__ = ["merge_states"]


@torch.library.custom_op("multiverse::merge_states", mutates_args=())
def _merge_states_op(v: Tensor, s: Tensor, backend: str, validate: bool) -> tuple[Tensor, Tensor]:
    _check(v, s)  # shapes/dtypes/devices only (no sync): always on
    return resolve("merge_states", backend, v.device)(v, s)


def _check(v: Tensor, s: Tensor) -> None:
    check_tensor("v", v, dim=4, dtypes=FLOAT_DTYPES)
    check_tensor("s", s, dim=3, dtypes=(torch.float32, torch.float64), device=v.device)
    if s.shape != v.shape[:3]:
        raise MetadataError(
            f"s: expected shape {tuple(v.shape[:3])} (v's [N, num_states, H]), got {tuple(s.shape)}"
        )


@_merge_states_op.register_fake
def _(v, s, backend, validate):
    fake_checks(_check, v, s)  # under torch.compile the real op raises at run time
    n, h, d = (v.shape[0], v.shape[2], v.shape[3]) if v.dim() == 4 else (1, 1, 1)
    return v.new_empty(n, h, d), s.new_empty(n, h, dtype=torch.float32)


def merge_states(v: Tensor, s: Tensor, *, backend: str = "auto",
                 validate: bool = True) -> tuple[Tensor, Tensor]:
    """Merge ``num_states`` partial states of each row.

    Args:
        v: [N, num_states, H, D] partial outputs (each normalised over its own keys).
        s: [N, num_states, H] float32 (or float64) lse of each partial; -inf for an empty partial.
    Returns:
        out [N, H, D] in ``v.dtype`` and lse [N, H] float32. A row whose partials are all empty gets
        out = 0 and lse = -inf.
    """
    return _merge_states_op(v, s, backend, validate)
