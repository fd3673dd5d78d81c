"""fp8 test inputs shared by the backends' fp8 tests (tests/backends/test_cpu_fp8.py, test_cuda_ops.py)."""

from __future__ import annotations

import torch


def fp8_inputs(meta, num_pages: int, hq: int, hk: int, d: int, qdtype: torch.dtype, fp8: torch.dtype,
               scales: str, seed: int):
    """q (qdtype) and fp8 caches quantized from random K/V with random scales, on the CPU: ``scales``
    "tensor" ([1] both), "head" ([hk] both) or "mixed" (k_scale [1], v_scale [hk])."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(meta.total_q, hq, d, generator=g).to(qdtype)
    k = torch.randn(num_pages, meta.page_size, hk, d, generator=g) * 2
    v = torch.randn(k.shape, generator=g)
    nk = 1 if scales == "tensor" else hk
    nv = hk if scales in ("head", "mixed") else 1
    ks = torch.rand(nk, generator=g) * 0.5 + 0.05
    vs = torch.rand(nv, generator=g) * 0.5 + 0.05
    return q, (k / ks.reshape(-1, 1)).to(fp8), (v / vs.reshape(-1, 1)).to(fp8), ks, vs
