"""Determinism (docs/errors.md, "Determinism"): the same inputs give bitwise-identical outputs run to
run and whatever the thread count, on every backend; and branch invariance: a branch's output is
bitwise identical whether its query group is computed alone or together with its siblings (same
forest, same cache)."""

from __future__ import annotations

import pytest
import torch
from _triton_interp import triton_interpreter  # noqa: F401  (module fixture: Triton runs CPU tensors)

import multiverse_kernels as mk
from multiverse_kernels.metadata import ForestMetadata
from multiverse_kernels.testing import multiverse_forest, random_forest, sampling_forest

BACKENDS = ("reference", "cpu", "triton")
D = 64


def _forests(full: bool = True):
    yield multiverse_forest(prefix=40, paths=4, path_len=12, concl_len=3)
    if full:
        yield sampling_forest(prompt=70, samples=6, gen_len=5, page_size=4)
        for seed in (3, 4):
            yield random_forest(seed, page_size=4, max_len=30, max_nodes=10)


def _inputs(f, meta, dtype=torch.float32, hq=4, hk=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(meta.total_q, hq, D, generator=g).to(dtype)
    k = torch.randn(f.num_pages, meta.page_size, hk, D, generator=g).to(dtype)
    return q, k, torch.randn(k.shape, generator=g).to(dtype)


def _only_group(f, groups, g: int) -> ForestMetadata:
    return f.metadata([groups[g]])


@pytest.mark.parametrize("backend", ("reference", "cpu", pytest.param("triton", marks=pytest.mark.slow)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_run_to_run_and_thread_count(backend, dtype):
    _run_to_run(backend, dtype, full=True)


def test_run_to_run_triton():
    """The default run's Triton check (interpreter: one forest; the full matrix is -m slow)."""
    _run_to_run("triton", torch.float32, full=False)


def _run_to_run(backend, dtype, full):
    old = torch.get_num_threads()
    try:
        for f, groups in _forests(full):
            meta = f.metadata(groups)
            q, k, v = _inputs(f, meta, dtype)
            outs = []
            for threads in (1, 2, 3, 1):
                torch.set_num_threads(threads)
                outs.append(mk.tree_attention(q, k, v, meta, backend=backend, return_lse=True))
            for o, lse in outs[1:]:
                assert torch.equal(o, outs[0][0]) and torch.equal(lse, outs[0][1])
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_branch_invariance(backend, dtype):
    for f, groups in _forests():
        meta = f.metadata(groups)
        q, k, v = _inputs(f, meta, dtype)
        out, lse = mk.tree_attention(q, k, v, meta, backend=backend, return_lse=True)
        qo = meta.qo_indptr.tolist()
        for g in range(len(groups)):
            if qo[g + 1] == qo[g]:
                continue
            alone = _only_group(f, groups, g)
            o1, l1 = mk.tree_attention(q[qo[g]:qo[g + 1]], k, v, alone, backend=backend, return_lse=True)
            assert torch.equal(o1, out[qo[g]:qo[g + 1]]), (backend, g)
            assert torch.equal(l1, lse[qo[g]:qo[g + 1]]), (backend, g)
