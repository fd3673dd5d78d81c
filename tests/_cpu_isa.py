"""The C++ CPU kernel's widest ISA path on this machine (for the ``isa`` fixture of
tests/backends/conftest.py and tests/backends/test_cpu_isa.py)."""

from __future__ import annotations

import os

import torch


def supported_isa() -> int:
    """Index in ISA_NAMES of the widest path this CPU (and build) runs, whatever MULTIVERSE_CPU_ISA says."""
    env = os.environ.pop("MULTIVERSE_CPU_ISA", None)
    try:
        return int(torch.ops.multiverse_C.cpu_isa()[1])
    finally:
        if env is not None:
            os.environ["MULTIVERSE_CPU_ISA"] = env
