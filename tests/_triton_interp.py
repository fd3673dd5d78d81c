"""Shared setup of the Triton interpreter tests (imported by tests/backends/test_triton_*.py, which skip
themselves without Triton, and by the tests that run every backend, whose triton cases are listed only
when Triton is installed: ``TRITON``, ``needs_triton``; a CPU-only torch has no Triton).

The Triton backend runs CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1`` was set
before the package was imported (tests/conftest.py sets it on machines without CUDA). The fixture skips
the module, with the reason, when the kernels were compiled instead (a GPU machine without
``TRITON_INTERPRET=1``), and poisons the kernels' outputs with NaN while the module runs.

What the interpreter covers and what it does not (docs/design.md §5):
  * fp32 and fp16: the kernels' exact code path (fp16 ``tl.dot`` with fp32 accumulation, p cast to
    fp16 for the PV product; fp32 dots are IEEE on both the interpreter and the GPU).
  * bf16: loads, stores and conversions are exercised, but the interpreter computes bf16 arithmetic and
    bf16 ``tl.dot`` wrongly without an error, so on CPU the kernel converts loaded bf16 values to fp32
    before any math (``MATH_FP32``). The bf16 tensor-core path (bf16 dots, p cast to bf16) is therefore
    NOT checked numerically here; only its compilation is (scripts/triton_compile_report.py).
  * Not covered: GPU scheduling, races between programs (there are none by construction: every output
    element and partial slot has one writer), performance.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import numpy as np
import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON: tuple[str, ...] = ("triton",) if HAS_TRITON else ()
"""``("triton",)`` when Triton is installed, else ``()``: splice into a test's backend list."""
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (e.g. a CPU-only torch)")


@functools.lru_cache(maxsize=1)
def numpy_matmul_row_invariant() -> bool:
    """Whether numpy's float32 matmul - the interpreter's ``tl.dot`` - gives a row of the left operand the
    same bits wherever the row sits in it (probed on tile-like shapes: 16-64 rows, K and N 16-128).
    Bitwise claims about which rows share a tile (plan invariance) need it. It depends on the BLAS
    kernel numpy picks for the CPU: OpenBLAS's AVX2 (Haswell / Zen) sgemm kernels handle the row
    remainder with other kernels and so sum in another order, measured on an AMD EPYC Zen 3."""
    rng = np.random.default_rng(0)
    for m, k, n in ((16, 32, 16), (16, 64, 32), (32, 64, 32), (32, 128, 64), (64, 64, 64)):
        for _ in range(8):
            a = rng.standard_normal((m, k)).astype(np.float32)
            b = rng.standard_normal((k, n)).astype(np.float32)
            whole = a @ b
            for src, dst in ((m - 1, 0), (0, m // 2 + 1)):
                moved = np.zeros_like(a)
                moved[dst] = a[src]
                if not np.array_equal((moved @ b)[dst], whole[src]):
                    return False
    return True


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """Skip unless the kernels are interpreted (or Triton is absent: then its cases are not listed);
    poison every backend's outputs with NaN for the module."""
    from multiverse_kernels.testing import poisoned_outputs

    if not HAS_TRITON:
        with poisoned_outputs():
            yield
        return
    tb = importlib.import_module("multiverse_kernels.backends.triton")
    if not tb.INTERPRETED:
        pytest.skip("the Triton kernels were compiled in this process (TRITON_INTERPRET was not 1 when "
                    "multiverse_kernels was imported); run with TRITON_INTERPRET=1 for the interpreter tests")
    with poisoned_outputs():
        yield
