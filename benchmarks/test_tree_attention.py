"""tree_attention forward, every CPU backend side by side (one decode step)."""

import pytest
import torch
from conftest import FORESTS, backends, run, workload

import multiverse_kernels as mk


@pytest.mark.parametrize("forest", sorted(FORESTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", backends("tree_attention"))
def test_tree_attention(benchmark, backend, forest, dtype):
    meta, q, k, v = workload(forest, dtype)
    benchmark.group = f"tree_attention {forest} {dtype}"
    out = run(benchmark, lambda: mk.tree_attention(q, k, v, meta, backend=backend, validate=False))
    assert out.shape == q.shape and torch.isfinite(out).all()
