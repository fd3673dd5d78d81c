"""Which implementation runs a call: the backend asked for, checked against the attention variants it
declares (``impl.variants``), or ``auto``'s first backend that implements them."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..backends import available_backends, resolve
from ..metadata import MetadataError
from ..variants import Variant, variant_names

__all__ = ["impl_for", "op_variant", "direct_call_ok", "check_flag"]


def op_variant(window: int, softcap: float, sinks: Tensor | None, k_scale: Tensor | None,
               v_scale: Tensor | None) -> Variant:
    """The op's flat variant arguments (0 / 0.0: off) as a :class:`Variant`."""
    return Variant(window=window or None, softcap=softcap or None, sinks=sinks, k_scale=k_scale,
                   v_scale=v_scale)


def direct_call_ok(*tensors: Tensor | None) -> bool:
    """Whether a public wrapper may run its op's implementation function directly, skipping torch's
    dispatcher (~50 us a call in Python, more with cold caches: as much as the kernel of a short decode
    step). Only where the dispatcher would add nothing: eager (not tracing or compiling), no gradient
    wanted from any of ``tensors`` (the autograd formula is the op's), plain tensors (no subclass, no
    functorch transform, no ``torch.jit.trace``), no torch-function or dispatch mode (FakeTensorMode,
    FlopCounterMode, a ``torch.device`` context, ...), no ``meta`` tensor (the op's fake implementation
    answers those) and the profiler off (so that its traces keep the op's name). Everything else goes
    through the op, which computes the same thing by the same function."""
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None:
        return False  # vmap / grad transforms; torch.jit.trace (records the op, not what it runs)
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or t.is_meta or (grad and t.requires_grad)):
            return False
    return True


def check_flag(name: str, value: object) -> None:
    """A public wrapper's bool keyword (``validate``) must be a bool: the op's schema refuses anything
    else, and the direct call (:func:`direct_call_ok`) would otherwise read any object by its truth."""
    if not isinstance(value, bool):
        raise MetadataError(f"{name}: expected a bool, got {value!r}")


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
