"""Shared plumbing of the Triton backend: launching a kernel under its tensors' device, and small helpers.

Kernels are ordinary ``@triton.jit`` functions (public Triton API only). Whether they run compiled or in
the Triton interpreter is decided the usual way, by ``TRITON_INTERPRET`` when this package is imported:
with ``TRITON_INTERPRET=1`` ``triton.jit`` returns interpreted kernels, which run CPU tensors (how the
tests run the kernels without a GPU; ``tests/conftest.py`` sets it on machines without CUDA). Otherwise
the kernels are compiled and run CUDA tensors only.

Every launch runs under ``torch.cuda.device(<the tensors' device>)``: Triton launches on the *current*
device and on that device's current stream, so tensors on another GPU than the current one would
otherwise be handed to a kernel on the wrong device. The current stream is the caller's (CUDA graphs,
side streams).

Anything that hooks Triton internals (counting loads in the interpreter, running the kernels interpreted
in a process where they were compiled) lives in :mod:`._measure`, used only for measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton


def interpreted(kernel: Any) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` object) runs in the Triton interpreter."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def launch(kernel: Any, grid: Sequence[int], device: torch.device, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` for tensors on ``device``, under that device's guard.

    CUDA tensors run the compiled kernel on ``device`` and its current stream; CPU tensors need the
    interpreter (``TRITON_INTERPRET=1`` before import).
    """
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[tuple(grid)](*args, **kwargs)
        return
    if device.type == "cpu":
        if not interpreted(kernel):
            raise RuntimeError("backend: 'triton' runs CPU tensors only in the Triton interpreter; set "
                               "TRITON_INTERPRET=1 before importing multiverse_kernels")
        kernel[tuple(grid)](*args, **kwargs)
        return
    raise RuntimeError(f"backend: 'triton' supports cuda (and interpreted cpu) tensors, got {device.type}")


def interpret_math_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """True when loaded values must be converted to float32 before any math: the Triton interpreter
    computes bf16 arithmetic and bf16 ``tl.dot`` wrongly without an error (docs/design.md §5)."""
    return device.type == "cpu" and dtype == torch.bfloat16


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()
