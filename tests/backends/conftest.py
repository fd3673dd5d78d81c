"""Fixtures of the backend tests."""

from __future__ import annotations

import pytest
from _cpu_isa import supported_isa

from multiverse_kernels.info import ISA_NAMES, kernel_isa


@pytest.fixture(params=ISA_NAMES)
def isa(request, monkeypatch) -> str:
    """Run the test once per ISA path of the C++ CPU kernel (baseline, AVX2, AVX-512, AVX-512 with
    AVX512-BF16), forced with ``MULTIVERSE_CPU_ISA``; a path this CPU cannot run is skipped with the
    reason."""
    name = request.param
    best = supported_isa()
    if ISA_NAMES.index(name) > best:
        pytest.skip(f"this CPU runs at most {ISA_NAMES[best]}: the {name} kernel cannot run here")
    monkeypatch.setenv("MULTIVERSE_CPU_ISA", name)
    assert kernel_isa()[0] == name
    return name
