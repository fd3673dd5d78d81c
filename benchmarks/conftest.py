"""pytest-benchmark microbenchmarks, one file per op (``python -m pytest benchmarks``).

Small CPU shapes so the whole directory runs in well under a minute; every available backend of an op
is a parameter, so one run shows them side by side (``--benchmark-group-by=group``, the default here:
one group per op and shape). Not collected by ``python -m pytest tests``. The numbers of the README
and docs come from ``python -m multiverse_kernels.bench`` (the main job), not from here.
"""

from __future__ import annotations

import pytest
import torch

from multiverse_kernels.backends import available_backends
from multiverse_kernels.testing import make_inputs, multiverse_forest, sampling_forest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

DEVICE = "cpu"


def backends(op: str) -> list[str]:
    """Backends of ``op`` on the CPU (the Triton interpreter is a correctness tool: not timed)."""
    return [b for b in available_backends(op, DEVICE) if b != "triton"]


FORESTS = {
    "multiverse": lambda: multiverse_forest(prefix=256, paths=8, path_len=32, concl_len=8, page_size=16),
    "sampling16": lambda: sampling_forest(prompt=256, samples=16, gen_len=16, page_size=16),
}


def workload(name: str, dtype: torch.dtype = torch.float32, hq: int = 8, hk: int = 2, d: int = 64):
    f, groups = FORESTS[name]()
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, hq, hk, d, dtype)
    return meta, q, k, v


def run(benchmark, fn, rounds: int = 5):
    """Time ``fn``: one warm-up call, then ``rounds`` rounds of one call (fixed, so the directory stays
    fast even for the slow reference backend). Returns ``fn``'s result."""
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
