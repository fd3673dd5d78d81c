"""append_paged_kv: write one decode step's K/V (16 branches) and a 512-token prefill into pages."""

import pytest
import torch
from conftest import backends, run

import multiverse_kernels as mk


@pytest.mark.parametrize("shape", ["decode16", "prefill512"])
@pytest.mark.parametrize("backend", backends("append_paged_kv"))
def test_append_paged_kv(benchmark, backend, shape):
    f = mk.KVForest(256, 16)
    if shape == "decode16":
        kids = f.fork(f.new_sequence(128), 16)
        parts = [f.append(k, 1) for k in kids]
    else:
        parts = [f.append(f.new_sequence(), 512)]
    node = torch.cat([p[0] for p in parts])
    pos = torch.cat([p[1] for p in parts])
    indptr, indices = f.page_table()
    g = torch.Generator().manual_seed(0)
    k = torch.randn(node.numel(), 2, 64, generator=g)
    v = torch.randn(node.numel(), 2, 64, generator=g)
    kc = torch.full((256, 16, 2, 64), float("nan"))
    vc = torch.full((256, 16, 2, 64), float("nan"))
    benchmark.group = f"append_paged_kv {shape}"
    run(benchmark, lambda: mk.append_paged_kv(k, v, kc, vc, indptr, indices, node, pos, backend=backend,
                                         validate=False))
    assert torch.isfinite(kc).sum() == k.numel()
