"""merge_states on every backend against the float64 reference, and the algebra of the merge (on the
default backend): merging the partials of any split equals the unsplit result; order is free.

Every backend case runs on each backend of ``multiverse_kernels.testing.BACKENDS`` (skipped with the
reason when one cannot run here; a missing C++ build FAILS with ``MULTIVERSE_REQUIRE_CPP=1``) through
``testing.check_merge_states``: outputs poisoned (NaN), the float64 reference on the same rounded inputs,
``testing.tolerance(dtype)``; rows whose states are all empty give 0 and lse -inf.
"""

import random

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.testing import backend_device, backend_params, check_merge_states

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (num_states, head_dim): 0 states (nothing to merge), one state, many; head dims the Triton kernel takes
# (powers of two) and 80 (not triton: a named error, test_triton_rejects_bad_input)
CASES = [(1, 64), (3, 128), (5, 256), (0, 64), (4, 128), (1, 80), (3, 80)]


@pytest.mark.parametrize("backend,num_states,d", [
    pytest.param(p.values[0], ns, d, id=f"{p.id}-{ns}-{d}", marks=p.marks)
    for p in backend_params() for ns, d in CASES if not (p.values[0] == "triton" and d == 80)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_against_reference(backend, num_states, d, dtype):
    n, h = (6, 3) if backend == "triton" else (37, 4)  # the interpreter runs one program per (row, head)
    check_merge_states(backend, n, num_states, h, d, dtype, seed=num_states * 7 + d)


def test_triton_rejects_bad_input():
    backend_device("triton")
    v = torch.zeros(2, 2, 1, 64, dtype=torch.float64)
    with pytest.raises(MetadataError, match="v: backend 'triton'"):
        mk.merge_states(v, torch.zeros(2, 2, 1, dtype=torch.float64), backend="triton")


def _partials(seed, n=5, h=3, d=16, keys=23, splits=4):
    """Attention of n rows over `keys` keys, computed whole and as partials over a random split."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(keys, h, d, generator=g, dtype=torch.float64)
    v = torch.randn(keys, h, d, generator=g, dtype=torch.float64)
    def attn(lo, hi):
        s = torch.einsum("nhd,khd->nhk", q, k[lo:hi])
        if hi == lo:
            return torch.zeros(n, h, d, dtype=torch.float64), torch.full((n, h), float("-inf"),
                                                                         dtype=torch.float64)
        return torch.einsum("nhk,khd->nhd", s.softmax(-1), v[lo:hi]), torch.logsumexp(s, -1)
    rng = random.Random(seed)
    cuts = sorted(rng.randint(0, keys) for _ in range(splits - 1))  # may produce empty parts
    bounds = [0] + cuts + [keys]
    parts = [attn(a, b) for a, b in zip(bounds, bounds[1:])]
    return attn(0, keys), parts


@pytest.mark.parametrize("seed", range(8))
def test_split_merge_equals_whole(seed):
    (whole_v, whole_s), parts = _partials(seed)
    v = torch.stack([p[0] for p in parts], 1)
    s = torch.stack([p[1] for p in parts], 1)
    out, lse = mk.merge_states(v, s)
    torch.testing.assert_close(out, whole_v, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, whole_s.float())
    # order does not matter
    perm = torch.randperm(v.shape[1], generator=torch.Generator().manual_seed(seed))
    out2, lse2 = mk.merge_states(v[:, perm], s[:, perm])
    torch.testing.assert_close(out2, out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse2, lse)


def test_merge_is_associative():
    (_, _), parts = _partials(3, splits=3)
    v = torch.stack([p[0] for p in parts], 1)
    s = torch.stack([p[1] for p in parts], 1).float()
    ab_v, ab_s = mk.merge_states(v[:, :2], s[:, :2])
    nested = mk.merge_states(torch.stack([ab_v, v[:, 2]], 1), torch.stack([ab_s, s[:, 2]], 1))
    flat = mk.merge_states(v, s)
    torch.testing.assert_close(nested[0], flat[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(nested[1], flat[1])


def test_empty_states_carry_nothing():
    (_, _), parts = _partials(5, splits=2)
    v = torch.stack([p[0] for p in parts], 1).float()
    s = torch.stack([p[1] for p in parts], 1).float()
    v_e = torch.cat([v, torch.full_like(v[:, :1], 7.0)], 1)  # garbage values under an empty state
    s_e = torch.cat([s, torch.full_like(s[:, :1], float("-inf"))], 1)
    a = mk.merge_states(v, s)
    b = mk.merge_states(v_e, s_e)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(dtype):
    (whole_v, whole_s), parts = _partials(1)
    v = torch.stack([p[0] for p in parts], 1).to(dtype)
    s = torch.stack([p[1] for p in parts], 1).float()
    out, lse = mk.merge_states(v, s)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), whole_v, atol=tol, rtol=tol)
