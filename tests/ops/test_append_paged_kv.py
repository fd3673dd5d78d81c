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
