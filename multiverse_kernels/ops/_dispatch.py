"""Which implementation runs a call: the backend asked for, checked against the attention variants it
declares (``impl.variants``), or ``auto``'s first backend that implements them."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..backends import available_backends, resolve
from ..variants import Variant, variant_names

__all__ = ["impl_for", "op_variant"]


def op_variant(window: int, softcap: float, sinks: Tensor | None, k_scale: Tensor | None,
               v_scale: Tensor | None) -> Variant:
    """The op's flat variant arguments (0 / 0.0: off) as a :class:`Variant`."""
    return Variant(window=window or None, softcap=softcap or None, sinks=sinks, k_scale=k_scale,
                   v_scale=v_scale)


def impl_for(op: str, backend: str, device: torch.device, variant: Variant) -> Callable:
    """The implementation of ``op`` that runs ``variant``: ``backend``'s if it declares every variant in
    use (its ``variants`` attribute), else a clear NotImplementedError naming them; ``auto`` takes the
    first backend in its order that implements them (warning once when that is the slow reference)."""
    impl = resolve(op, backend, device)
    need = variant.names()
    missing = need - variant_names(impl)
    if not missing:
        return impl
    if backend != "auto":
        raise NotImplementedError(
            f"backend: {backend!r} does not implement {', '.join(sorted(missing))} for {op} yet "
            f"(docs/design.md, 'Attention variants'); backend='reference' does, and backend='auto' picks "
            "a backend that does")
    for b in available_backends(op, device):
        cand = resolve(op, b, device)
        if need <= variant_names(cand):
            if b == "reference" and (op, tuple(sorted(need))) not in _WARNED:
                _WARNED.add((op, tuple(sorted(need))))
                warnings.warn(f"multiverse_kernels: no fast {device.type} backend implements "
                              f"{', '.join(sorted(need))} for {op} yet: running the reference (slow)",
                              RuntimeWarning, stacklevel=3)
            return cand
    raise NotImplementedError(f"no backend implements {', '.join(sorted(need))} for {op} on {device.type}")


_WARNED: set[tuple[str, tuple[str, ...]]] = set()
