"""Shared plumbing of the Triton backend: compiled vs interpreted launch, and the KV-load tally.

Kernels are written as plain Python functions and wrapped here, not with ``@triton.jit``: ``triton.jit``
decides between compiling and interpreting when the module is imported (``TRITON_INTERPRET``), which
would make the backend depend on import order. We keep both wrappers and pick per call: CUDA tensors
run the compiled kernel; CPU tensors run the Triton interpreter (only when ``TRITON_INTERPRET=1``, see
``__init__.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from triton.runtime.jit import JITFunction

_JIT: dict[Callable, JITFunction] = {}
_INTERP: dict[Callable, object] = {}


def interpreter_enabled() -> bool:
    """True when CPU tensors may run through the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def jit(fn: Callable) -> JITFunction:
    """The compiled (GPU) kernel object of ``fn`` (also what the compile report compiles)."""
    if fn not in _JIT:
        _JIT[fn] = JITFunction(fn, do_not_specialize=list(getattr(fn, "do_not_specialize", ())))
    return _JIT[fn]


def kernel(fn: Callable, device: torch.device):
    """``fn`` ready to launch (``kernel(fn, dev)[grid](...)``) for tensors on ``device``."""
    if device.type == "cuda":
        return jit(fn)
    if device.type == "cpu":
        if not interpreter_enabled():
            raise RuntimeError("backend: 'triton' runs CPU tensors only in the Triton interpreter; set "
                               "TRITON_INTERPRET=1")
        if fn not in _INTERP:
            _INTERP[fn] = _Interpreted(fn)
        return _INTERP[fn]
    raise RuntimeError(f"backend: 'triton' supports cuda (and interpreted cpu) tensors, got {device.type}")


class _Interpreted:
    """``fn`` run by the Triton interpreter, whatever ``TRITON_INTERPRET`` was when triton was imported.

    triton.language's own helpers (``tl.max``, ``tl.sum``, ``tl.zeros``, ...) are ``@triton.jit``
    functions decorated when triton is imported: compiled ``JITFunction`` objects unless
    ``TRITON_INTERPRET=1`` was set by then, and a ``JITFunction`` refuses to be called from Python. While
    an interpreted kernel runs, we let such calls run through the interpreter too (restored after).
    """

    def __init__(self, fn: Callable) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        self.fn = InterpretedFunction(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _jit_calls_interpreted():
                return self.fn[grid](*args, **kwargs)

        return launch


_HELPERS: dict[Callable, object] = {}


@contextlib.contextmanager
def _jit_calls_interpreted() -> Iterator[None]:
    """Run device-function calls through the interpreter, and undo every triton.language patch after.

    ``InterpretedFunction.__call__`` (a device-function call in the interpreter) patches
    ``triton.language`` for the interpreter and never restores it; later *compilation* in the same
    process (the compile report, a CUDA launch) would then fail. We record the first original of every
    attribute the interpreter patches while the launch runs and put them all back at the end.
    """
    from triton.runtime import interpreter as ti

    def call(self, *args, **kwargs):
        if self.fn not in _HELPERS:
            _HELPERS[self.fn] = ti.InterpretedFunction(self.fn)
        return _HELPERS[self.fn](*args, **kwargs)

    missing = object()
    originals: dict[tuple[int, str], tuple[object, str, object]] = {}
    scope_set_attr = ti._LangPatchScope.set_attr

    def recording_set_attr(scope, obj, name, value):
        key = (id(obj), name)
        if key not in originals:
            own = vars(obj).get(name, missing) if hasattr(obj, "__dict__") else getattr(obj, name, missing)
            originals[key] = (obj, name, own)
        return scope_set_attr(scope, obj, name, value)

    had = "__call__" in vars(JITFunction)
    original_call = vars(JITFunction).get("__call__")
    JITFunction.__call__ = call
    ti._LangPatchScope.set_attr = recording_set_attr
    try:
        yield
    finally:
        ti._LangPatchScope.set_attr = scope_set_attr
        for obj, name, own in reversed(list(originals.values())):
            if own is missing:
                if hasattr(obj, "__dict__") and name in vars(obj):
                    delattr(obj, name)
            else:
                setattr(obj, name, own)
        if had:
            JITFunction.__call__ = original_call
        else:
            del JITFunction.__call__


def interpret_math_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """True when loaded values must be converted to float32 before any math: the Triton interpreter
    computes bf16 arithmetic and bf16 ``tl.dot`` wrongly without an error (docs/design.md §5)."""
    return device.type == "cpu" and dtype == torch.bfloat16


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


@contextlib.contextmanager
def count_loads(regions: dict[str, Tensor]) -> Iterator[dict[str, int]]:
    """Tally the bytes the *interpreted* kernels load from each tensor's storage in ``regions``.

    Wraps the interpreter builder's masked load: for every load, the masked-in element addresses
    that fall inside a region's storage are counted (element size of the loaded type). Yields a dict
    name -> bytes, filled while the context is open. Only kernels run in the interpreter are seen.
    """
    from triton.runtime.interpreter import interpreter_builder

    spans = {}
    for name, t in regions.items():
        st = t.untyped_storage()
        spans[name] = (st.data_ptr(), st.data_ptr() + st.nbytes())
    tally = dict.fromkeys(regions, 0)
    original = interpreter_builder.create_masked_load

    def counting_load(ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        ret = original(ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)
        addr = np.asarray(ptrs.data).astype(np.uint64)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        addr = addr[m]
        item = np.dtype(ret.data.dtype).itemsize
        for name, (lo, hi) in spans.items():
            tally[name] += int(((addr >= lo) & (addr < hi)).sum()) * item
        return ret

    shadowed = "create_masked_load" in vars(interpreter_builder)
    interpreter_builder.create_masked_load = counting_load
    try:
        yield tally
    finally:
        if shadowed:
            interpreter_builder.create_masked_load = original
        else:
            del interpreter_builder.create_masked_load  # back to the class method
