"""tree_attention backward (packed training): the backward op, every CPU backend."""

import pytest
import torch
from conftest import backends, run, workload

import multiverse_kernels as mk
from multiverse_kernels.ops.tree_attention_backward import tree_attention_backward


@pytest.mark.parametrize("backend", backends("tree_attention_backward"))
def test_tree_attention_backward(benchmark, backend):
    meta, q, k, v = workload("multiverse")
    out, lse = mk.tree_attention(q, k, v, meta, return_lse=True, backend="reference")
    dout = torch.randn_like(out)
    benchmark.group = "tree_attention_backward multiverse"
    dq, dk, dv = run(benchmark, lambda: tree_attention_backward(dout, q, k, v, out, lse, meta,
                                                                backend=backend, validate=False))
    assert dq.shape == q.shape and torch.isfinite(dq).all()
