"""Test-session setup: the Triton interpreter is switched on the usual way on machines without CUDA, and
the ``poisoned`` fixture (every backend's outputs NaN-filled:
``multiverse_kernels.testing.poisoned_outputs``).

``TRITON_INTERPRET=1`` must be in the environment before ``triton.jit`` decorates the kernels (at the
first import of ``multiverse_kernels.backends.triton``); it is set here, before any test module imports
the package, unless the caller set ``TRITON_INTERPRET`` already or a CUDA GPU is present (the GPU run,
``python -m multiverse_kernels.gpu_run``, wants compiled kernels and runs the interpreter tests in a
step of their own with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The tests live in folders by concern (ops, backends, contracts, integrations, tooling); their shared
# helpers (_triton_interp.py, _multiverse_script.py, _strategies.py) sit here and are imported by module
# name, as are a few helpers of one folder's tests used by another's (test module names are unique).
_HERE = Path(__file__).resolve().parent
for _d in [_HERE, *sorted(p for p in _HERE.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))]:
    sys.path.insert(0, str(_d))

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def poisoned():
    """Every backend fills outputs and workspaces with NaN for the test (the one poisoning switch)."""
    from multiverse_kernels.testing import poisoned_outputs

    with poisoned_outputs():
        yield
