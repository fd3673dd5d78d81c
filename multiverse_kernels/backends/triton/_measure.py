"""Measurement only: the one place that hooks Triton internals (not used by any kernel or launch).

* :func:`count_loads` counts, at every load the *interpreted* kernels issue, the bytes that fall inside
  given tensors' storage (wraps the interpreter builder's ``create_masked_load``).
* :func:`interpreted_kernels` runs this package's kernels in the Triton interpreter inside a process
  where they were compiled (``TRITON_INTERPRET`` unset at import, e.g. the benchmark on a GPU machine
  counting the Triton kernels' KV bytes): it swaps interpreted copies of the kernels into their modules
  and lets the calls of ``triton.language``'s own ``@jit`` helpers (``tl.max``, ``tl.sum``...) run
  interpreted, then restores everything, including whatever the interpreter patched in
  ``triton.language``.

Both are tested on Triton 3.6 (torch 2.11, the GPU image) and Triton 3.8 (the pinned torch 2.14.1):
tests/backends/test_triton_measure.py, run by CI in both environments (.ci/run).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import numpy as np
from torch import Tensor
from triton.runtime import JITFunction

from ._common import interpreted

# module -> attribute names of the kernels (the launches look them up in their module at call time)
KERNELS = {
    "multiverse_kernels.backends.triton.tree_attention": ("_tree_attn_kernel",),
    "multiverse_kernels.backends.triton.merge_states": ("_merge_kernel",),
    "multiverse_kernels.backends.triton.append_paged_kv": ("_append_kernel",),
}


@contextlib.contextmanager
def count_loads(regions: dict[str, Tensor]) -> Iterator[dict[str, int]]:
    """Tally the bytes the *interpreted* kernels load from each tensor's storage in ``regions``.

    For every load, the masked-in element addresses that fall inside a region's storage are counted
    (element size of the loaded type). Yields a dict name -> bytes, filled while the context is open.
    Only kernels run in the interpreter are seen (see :func:`interpreted_kernels`).
    """
    from triton.runtime.interpreter import interpreter_builder

    spans = {}
    for name, t in regions.items():
        st = t.untyped_storage()
        spans[name] = (st.data_ptr(), st.data_ptr() + st.nbytes())
    tally = dict.fromkeys(regions, 0)
    original = interpreter_builder.create_masked_load

    def counting_load(ptrs, mask, other, *args, **kwargs):
        ret = original(ptrs, mask, other, *args, **kwargs)
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


@contextlib.contextmanager
def interpreted_kernels() -> Iterator[None]:
    """Run this package's Triton kernels in the interpreter while the context is open (CPU tensors).

    A no-op when they are interpreted already (``TRITON_INTERPRET=1`` at import). Otherwise interpreted
    copies replace the compiled kernels in their modules, calls of compiled ``@jit`` helpers from inside
    them run through the interpreter, and on exit the kernels, ``JITFunction.__call__`` and every
    attribute the interpreter patched in ``triton.language`` are put back (later compiles and CUDA
    launches in the same process then work as before).
    """
    mods = {name: importlib.import_module(name) for name in KERNELS}
    if all(interpreted(getattr(mods[m], a)) for m, names in KERNELS.items() for a in names):
        yield
        return
    from triton.runtime import interpreter as ti

    swapped = []
    for m, names in KERNELS.items():
        for a in names:
            k = getattr(mods[m], a)
            if not interpreted(k):
                swapped.append((mods[m], a, k))
                setattr(mods[m], a, ti.InterpretedFunction(k.fn))

    helpers: dict = {}

    def call(self, *args, **kwargs):  # a compiled @jit helper called from an interpreted kernel
        if self.fn not in helpers:
            helpers[self.fn] = ti.InterpretedFunction(self.fn)
        return helpers[self.fn](*args, **kwargs)

    missing = object()
    originals: dict[tuple[int, str], tuple[object, str, object]] = {}
    scope_cls = ti._LangPatchScope
    scope_set_attr = scope_cls.set_attr

    def recording_set_attr(scope, obj, name, value):
        key = (id(obj), name)
        if key not in originals:
            own = vars(obj).get(name, missing) if hasattr(obj, "__dict__") else getattr(obj, name, missing)
            originals[key] = (obj, name, own)
        return scope_set_attr(scope, obj, name, value)

    had_call = "__call__" in vars(JITFunction)
    original_call = vars(JITFunction).get("__call__")
    JITFunction.__call__ = call
    scope_cls.set_attr = recording_set_attr
    try:
        yield
    finally:
        scope_cls.set_attr = scope_set_attr
        for obj, name, own in reversed(list(originals.values())):
            if own is missing:
                if hasattr(obj, "__dict__") and name in vars(obj):
                    delattr(obj, name)
            else:
                setattr(obj, name, own)
        if had_call:
            JITFunction.__call__ = original_call
        else:
            del JITFunction.__call__
        for mod, a, k in swapped:
            setattr(mod, a, k)
