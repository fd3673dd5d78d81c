"""Backend registry: every op has one schema and several implementations keyed by ``backend=``.

A backend module registers its implementations with :func:`register` when imported. Optional backends
(triton, cpu, cuda) are imported lazily on first use; an import failure is remembered and reported
when that backend is asked for by name. ``backend="auto"`` takes the first available backend of
``AUTO_ORDER`` for the tensors' device type.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable

import torch

__all__ = ["register", "resolve", "available_backends", "AUTO_ORDER", "BACKENDS"]

BACKENDS = ("reference", "triton", "cpu", "cuda")
# Preference per device type for backend="auto" (fastest first).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

# op name -> backend name -> (impl, device types it accepts)
_IMPLS: dict[str, dict[str, tuple[Callable, frozenset[str]]]] = {}
_LOAD_ERRORS: dict[str, str] = {}
_loaded = False


def register(op: str, backend: str, devices: tuple[str, ...] = ("cpu", "cuda")) -> Callable:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op`` for ``devices``."""

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = (fn, frozenset(devices))
        return fn

    return deco


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(".reference", __name__)
    for name in BACKENDS[1:]:
        if os.environ.get(f"MULTIVERSE_DISABLE_{name.upper()}") == "1":
            _LOAD_ERRORS[name] = f"disabled by MULTIVERSE_DISABLE_{name.upper()}=1"
            continue
        try:
            importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:  # backend not written / dependency missing
            _LOAD_ERRORS[name] = f"{type(e).__name__}: {e}"
        except (ImportError, OSError, RuntimeError) as e:  # extension built wrongly, driver issues
            _LOAD_ERRORS[name] = f"{type(e).__name__}: {e}"
    if "cpu" in _LOAD_ERRORS and not _LOAD_ERRORS["cpu"].startswith("disabled"):
        # The C++ kernels are expected wherever there is a compiler: say once that auto falls back.
        warnings.warn(f"multiverse_kernels: C++ CPU kernels unavailable ({_LOAD_ERRORS['cpu']}); "
                      "backend='auto' runs the reference on CPU tensors", RuntimeWarning, stacklevel=3)


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """Backends that implement ``op`` for tensors on ``device``, in ``auto`` preference order."""
    _load()
    dt = torch.device(device).type
    impls = _IMPLS.get(op, {})
    order = AUTO_ORDER.get(dt, ("reference",))
    names = [b for b in order if b in impls and dt in impls[b][1]]
    names += [b for b in impls if b not in names and dt in impls[b][1]]
    return names


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for ``backend`` ("auto" or a name) on ``device``."""
    _load()
    impls = _IMPLS.get(op, {})
    dt = device.type
    if backend == "auto":
        for b in AUTO_ORDER.get(dt, ("reference",)):
            entry = impls.get(b)
            if entry is not None and dt in entry[1]:
                return entry[0]
        raise RuntimeError(f"backend: no implementation of {op} for device type {dt!r}")
    entry = impls.get(backend)
    if entry is None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
        why = _LOAD_ERRORS.get(backend, "it does not implement this op")
        raise RuntimeError(f"backend: {backend!r} is not available for {op} ({why})")
    fn, devices = entry
    if dt not in devices:
        raise RuntimeError(
            f"backend: {backend!r} implements {op} for {sorted(devices)} tensors, got {dt!r} tensors"
        )
    return fn
