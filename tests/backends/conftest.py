"""Fixtures of the backend tests."""

from __future__ import annotations

import pytest
import torch
from _cpu_isa import supported_isa

from multiverse_kernels.info import ISA_NAMES, isa_runnable, kernel_isa


@pytest.fixture(params=ISA_NAMES)
def isa(request, monkeypatch) -> str:
    """Run the test once per ISA path of the C++ CPU kernel (baseline, AVX2, AVX-512, AVX-512 with
    AVX512-BF16, AMX, and AMX's code on the software model of its tiles), forced with
    ``MULTIVERSE_CPU_ISA``; a path this CPU cannot run is skipped with the reason."""
    name = request.param
    best = supported_isa()
    if not isa_runnable(name, ISA_NAMES[best]):
        need = "needs avx512_bf16" if name == "amx_emulated" else "cannot run here"
        pytest.skip(f"this CPU runs at most {ISA_NAMES[best]}: the {name} kernel {need}")
    if name == "amx_emulated":  # (the amx case, where the CPU has AMX, runs every dtype)
        params = getattr(request.node, "callspec", None)
        dtype = params.params.get("dtype") if params is not None else None
        if "fp8" in request.module.__name__ or (dtype is not None and dtype != torch.bfloat16):
            pytest.skip("amx_emulated differs from avx512_bf16 only in bf16 steps (bf16 q and caches): this "
                        "case runs the avx512_bf16 code, which its avx512_bf16 case checks")
    monkeypatch.setenv("MULTIVERSE_CPU_ISA", name)
    assert kernel_isa()[0] == name
    return name
