"""append_paged_kv on every backend against the reference: bit-exact copies (and casts) of new tokens'
K/V into NaN-filled paged caches, every new token written and nothing else.

Every case runs on each backend of ``multiverse_kernels.testing.BACKENDS`` (skipped with the reason when
one cannot run here; a missing C++ build FAILS with ``MULTIVERSE_REQUIRE_CPP=1``) through
``testing.check_append_paged_kv``. The C++ fp16/bf16 conversions' rounding is tested on its own in
tests/backends/test_cpu_ops.py.
"""

from __future__ import annotations

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.testing import backend_params, check_append_paged_kv, forest_tokens, random_forest

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKEND = backend_params()
# whole-forest appends run one interpreter program per token: slow for triton in the interpreter, whose
# default-run share is test_append_crossing_pages
WHOLE = backend_params(interp_slow=True)


@pytest.mark.parametrize("backend", WHOLE)
@pytest.mark.parametrize("src,cache", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                       (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                       (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("page_size", [1, 16])
def test_source_and_cache_dtypes(backend, src, cache, page_size):
    """Every token of a random forest, same dtype and fp32 sources cast to the cache dtype."""
    f, _ = random_forest(21, page_size=page_size)
    check_append_paged_kv(backend, f, *forest_tokens(f), 2, 64, src, cache)


@pytest.mark.parametrize("backend,page_size,hk,d", [
    pytest.param(p.values[0], *c, id=f"{p.id}-{c[0]}-{c[1]}-{c[2]}", marks=p.marks)
    for p in WHOLE for c in [(1, 1, 64), (16, 4, 128), (16, 2, 256), (16, 2, 20)]
    if not (p.values[0] == "triton" and c[2] == 20)])  # triton: head_dim a power of two (named error)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(backend, dtype, page_size, hk, d):
    """Head counts and dims (20: not a multiple of the vector width), fp32 sources cast to ``dtype``."""
    f, _ = random_forest(31, page_size=page_size)
    check_append_paged_kv(backend, f, *forest_tokens(f), hk, d, torch.float32, dtype, seed=d)


@pytest.mark.parametrize("backend", [p for p in WHOLE])
@pytest.mark.parametrize("page_size,hk", [(1, 2), (16, 4)])
def test_head_major_caches(backend, page_size, hk):
    """Caches stored head-major ([pages, Hk, page_size, D], passed as a transposed view: the faster
    layout for the cpu kernel) are written at their strides."""
    f, _ = random_forest(23, page_size=page_size)
    check_append_paged_kv(backend, f, *forest_tokens(f), hk, 64, torch.float32, torch.float16, seed=5,
                          head_major=True)


@pytest.mark.parametrize("backend", BACKEND)
@pytest.mark.parametrize("page_size,hk,d,dtype", [
    (1, 1, 64, torch.float32), (4, 2, 128, torch.float16), (16, 3, 256, torch.bfloat16),
    (128, 8, 64, torch.float16),
])
def test_append_crossing_pages(backend, page_size, hk, d, dtype):
    """A decode step's new tokens (1, 3 and page_size + 1 per leaf: the last crosses a page boundary)
    into a shuffled pool, fp32 sources cast to the cache dtype."""
    order = torch.randperm(24, generator=torch.Generator().manual_seed(page_size)).tolist()
    f = mk.KVForest(24, page_size, page_order=order)
    root = f.new_sequence(5)
    nodes, pos = [], []
    for i, leaf in enumerate(f.fork(root, 3)):
        nd, ps = f.append(leaf, [1, 3, page_size + 1][i])
        nodes.append(nd)
        pos.append(ps)
    check_append_paged_kv(backend, f, torch.cat(nodes), torch.cat(pos), hk, d, torch.float32, dtype, seed=d)


def test_eager_append_skips_the_dispatcher_and_bumps_the_caches_versions(monkeypatch):
    """An eager append with no gradient wanted runs the op's function directly (ops/_dispatch.py) and
    moves the caches' version counters as the op's in-place registration does (so autograd still sees a
    cache written after a forward saved it); with a gradient wanted it goes through the op. Same bytes
    either way."""
    import importlib

    mod = importlib.import_module("multiverse_kernels.ops.append_paged_kv")
    f = mk.KVForest(16, 4)
    n = f.new_sequence(5)
    node, pos = f.append(n, 3)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    calls = []
    real = mod._append_paged_kv_op
    monkeypatch.setattr(mod, "_append_paged_kv_op", lambda *a: calls.append(1) or real(*a))
    for backend in ("cpu", "reference"):
        kc, vc = torch.full((16, 4, 2, 8), float("nan")), torch.full((16, 4, 2, 8), float("nan"))
        kr, vr = kc.clone(), vc.clone()
        versions = kc._version, vc._version
        mk.append_paged_kv(k, v, kc, vc, *f.page_table(), node, pos, backend=backend)
        assert not calls and kc._version > versions[0] and vc._version > versions[1]
        real(k, v, kr, vr, *f.page_table(), node, pos, backend, True)
        assert torch.equal(kc.nan_to_num(7.0), kr.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0),
                                                                                   vr.nan_to_num(7.0))
    q = torch.randn(1, 4, 8, requires_grad=True)
    m = f.metadata([(n, 1)])
    out = mk.tree_attention(q, kc, vc, m, backend="cpu")  # saves the caches for its backward
    mk.append_paged_kv(k, v, kc, vc, *f.page_table(), node, pos, backend="cpu")  # writes them again
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    kg = k.clone().requires_grad_()
    mk.append_paged_kv(kg, v, kc, vc, *f.page_table(), node, pos, backend="cpu")
    assert len(calls) == 1


def test_append_checks_a_steps_index_tensors_once(monkeypatch):
    """validate=True checks the page table and token ids once per step's tensors (plan_cache.check_once):
    again for new tensors or changed contents (behind the version counter too), and a bad one raises."""
    import importlib

    mod = importlib.import_module("multiverse_kernels.ops.append_paged_kv")
    f = mk.KVForest(16, 4)
    n = f.new_sequence(5)
    node, pos = f.append(n, 3)
    k = torch.randn(3, 2, 8)
    kc, vc = torch.zeros(16, 4, 2, 8), torch.zeros(16, 4, 2, 8)
    calls = []
    real = mod._validate_data
    monkeypatch.setattr(mod, "_validate_data", lambda *a: calls.append(1) or real(*a))
    indptr, indices = f.page_table()
    for _ in range(3):
        mk.append_paged_kv(k, k, kc, vc, indptr, indices, node, pos, backend="cpu")
    assert len(calls) == 1
    mk.append_paged_kv(k, k, kc, vc, indptr, indices, node.clone(), pos, backend="cpu")
    assert len(calls) == 2
    pos.numpy()[0] = 10_000  # behind the version counter: checked again, and caught
    with pytest.raises(mk.MetadataError, match="token_pos"):
        mk.append_paged_kv(k, k, kc, vc, indptr, indices, node, pos, backend="cpu")
    with pytest.raises(mk.MetadataError, match="token_pos"):
        mk.append_paged_kv(k, k, kc, vc, indptr, indices, node, pos, backend="cpu")
