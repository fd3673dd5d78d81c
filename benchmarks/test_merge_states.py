"""merge_states: log-sum-exp merge of partial states, every CPU backend."""

import pytest
import torch
from conftest import backends, run

import multiverse_kernels as mk


@pytest.mark.parametrize("num_states", [2, 8])
@pytest.mark.parametrize("backend", backends("merge_states"))
def test_merge_states(benchmark, backend, num_states):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(256, num_states, 8, 64, generator=g)
    s = torch.randn(256, num_states, 8, generator=g)
    benchmark.group = f"merge_states {num_states} states"
    out, lse = run(benchmark, lambda: mk.merge_states(v, s, backend=backend))
    assert out.shape == (256, 8, 64) and torch.isfinite(lse).all()
