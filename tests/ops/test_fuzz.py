"""Property-based fuzzing with hypothesis (docs/errors.md).

* Valid random forests (built from a drawn list of forest operations, so a failure shrinks to a minimal
  forest: fewest nodes, shortest nodes, page size 1 ...) against the reference, for every op and
  backend: tree_attention (the reference itself against the dense L x L mask), merge_states and
  append_paged_kv. Outputs are NaN-poisoned by the backends' test mode, so unwritten elements fail.
* Mutated invalid metadata: one field broken at a time must raise ``MetadataError`` naming a field
  the mutation touches (or the one it contradicts) on every backend; never a crash.

The default run keeps few examples; ``-m slow`` (CI) runs >= 1000 examples per op per backend.
"""

from __future__ import annotations

import pytest
import torch
from _strategies import NUM_PAGES, forests
from _triton_interp import TRITON, needs_triton, triton_interpreter  # noqa: F401  (module fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multiverse_kernels as mk
from multiverse_kernels.metadata import ForestMetadata, MetadataError
from multiverse_kernels.testing import tolerance

BACKENDS = ("reference", "cpu", *TRITON)
FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=1000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# The Triton interpreter runs ~0.4 s an example on its small forests: 1000 each for attention and append
# take ~7 min apiece on 2 cores, inside CI's separate slow step (.ci/run; docs/errors.md).
SLOW_TRITON = SLOW


def _inputs(meta: ForestMetadata, hq: int, hk: int, d: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(meta.total_q, hq, d, generator=g)
    k = torch.randn(NUM_PAGES, meta.page_size, hk, d, generator=g)
    v = torch.randn(k.shape, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ------------------------------------------------------------------------------ tree_attention
def _check_attention(backend, meta, heads, d, dtype, seed):
    hq, hk = heads
    q, k, v = _inputs(meta, hq, hk, d, dtype, seed)
    out, lse = mk.tree_attention(q, k, v, meta, backend=backend, return_lse=True)
    if backend == "reference":
        ref = mk.dense_attention(q.double(), k.double(), v.double(), meta)
        torch.testing.assert_close(out.double(), ref, **tolerance(dtype))
        return
    ref_out, ref_lse = mk.tree_attention(q, k, v, meta, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref_out, **tolerance(dtype))
    torch.testing.assert_close(lse, ref_lse, **tolerance(dtype))


ATT = dict(meta=forests(), heads=st.sampled_from([(1, 1), (4, 2), (4, 1), (8, 8)]),
           d=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.float32, torch.float16]),
           seed=st.integers(0, 2**16))
# Triton runs in the interpreter: small forests, one head size, to fit 1000 examples in minutes
ATT_TRITON = dict(ATT, meta=forests(max_ops=4, max_len=10), heads=st.sampled_from([(2, 1), (2, 2)]),
                  d=st.just(64))


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@FAST
@given(**ATT)
def test_fuzz_tree_attention(backend, meta, heads, d, dtype, seed):
    _check_attention(backend, meta, heads, d, dtype, seed)


@needs_triton
@FAST
@given(**ATT_TRITON)
def test_fuzz_tree_attention_triton(meta, heads, d, dtype, seed):
    _check_attention("triton", meta, heads, d, dtype, seed)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ("reference", "cpu"))
@SLOW
@given(**ATT)
def test_fuzz_tree_attention_slow(backend, meta, heads, d, dtype, seed):
    _check_attention(backend, meta, heads, d, dtype, seed)


@needs_triton
@pytest.mark.slow
@SLOW_TRITON
@given(**ATT_TRITON)
def test_fuzz_tree_attention_triton_slow(meta, heads, d, dtype, seed):
    _check_attention("triton", meta, heads, d, dtype, seed)


# ------------------------------------------------------------------ tree_attention: window, soft-cap
def _check_attention_variant(meta, heads, d, dtype, seed, window, softcap):
    """The cpu kernels (forward and backward) with a drawn window / soft-cap against the reference."""
    hq, hk = heads
    q, k, v = _inputs(meta, hq, hk, d, dtype, seed)
    kw = dict(window=window, softcap=softcap)
    res = []
    for backend in ("cpu", "reference"):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = mk.tree_attention(*ins, meta, backend=backend, return_lse=True, **kw)
        (out.float().sum() + lse.sum()).backward()
        res.append([out.float(), lse] + [t.grad.float() for t in ins])
    tol = tolerance(dtype)
    for i, (a, b) in enumerate(zip(*res, strict=True)):
        t = tol if i < 2 else {name: 5 * x for name, x in tol.items()}  # grads: sums of many terms
        torch.testing.assert_close(a.detach(), b.detach(), **t)


VAR = dict(ATT, window=st.one_of(st.none(), st.integers(1, 40)),
           softcap=st.one_of(st.none(), st.floats(0.5, 30.0)))


@settings(FAST, max_examples=12)
@given(**VAR)
def test_fuzz_tree_attention_variants(meta, heads, d, dtype, seed, window, softcap):
    _check_attention_variant(meta, heads, d, dtype, seed, window, softcap)


@pytest.mark.slow
@SLOW
@given(**VAR)
def test_fuzz_tree_attention_variants_slow(meta, heads, d, dtype, seed, window, softcap):
    _check_attention_variant(meta, heads, d, dtype, seed, window, softcap)


# ------------------------------------------------------------------------------ merge_states
@st.composite
def merge_inputs(draw):
    n, s, h = draw(st.integers(0, 5)), draw(st.integers(0, 4)), draw(st.integers(1, 3))
    d = draw(st.sampled_from([16, 64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    v = torch.randn(n, s, h, d, generator=g)
    lse = torch.randn(n, s, h, generator=g) * 5
    empty = torch.rand(n, s, h, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    lse[empty] = float("-inf")
    return v.to(draw(st.sampled_from([torch.float32, torch.float16]))), lse


def _check_merge(backend, vs):
    v, s = vs
    out, lse = mk.merge_states(v, s, backend=backend)
    ref_out, ref_lse = mk.merge_states(v.double(), s.double(), backend="reference")
    torch.testing.assert_close(out.double(), ref_out, **tolerance(v.dtype))
    torch.testing.assert_close(lse.double(), ref_lse.double(), **tolerance(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(vs=merge_inputs())
def test_fuzz_merge_states(backend, vs):
    _check_merge(backend, vs)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(vs=merge_inputs())
def test_fuzz_merge_states_slow(backend, vs):
    _check_merge(backend, vs)


# ------------------------------------------------------------------------------ append_paged_kv
def _check_append(backend, meta, seed):
    g = torch.Generator().manual_seed(seed)
    lens = meta.node_len.tolist()
    toks = [(n, p) for n in range(meta.num_nodes) for p in range(lens[n])]
    pick = torch.randperm(len(toks), generator=g)[: min(len(toks), 24)].tolist()
    node = torch.tensor([toks[i][0] for i in pick], dtype=torch.int32)
    pos = torch.tensor([toks[i][1] for i in pick], dtype=torch.int32)
    k = torch.randn(len(pick), 2, 64, generator=g)
    v = torch.randn(len(pick), 2, 64, generator=g)
    base = torch.randn(NUM_PAGES, meta.page_size, 2, 64, generator=g)
    kc, vc, rk, rv = base.clone(), base.clone(), base.clone(), base.clone()
    args = (meta.node_page_indptr, meta.node_page_indices, node, pos)
    mk.append_paged_kv(k, v, kc, vc, *args, backend=backend)
    mk.append_paged_kv(k, v, rk, rv, *args, backend="reference")
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(meta=forests(), seed=st.integers(0, 2**16))
def test_fuzz_append_paged_kv(backend, meta, seed):
    _check_append(backend, meta, seed)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@SLOW
@given(meta=forests(), seed=st.integers(0, 2**16))
def test_fuzz_append_paged_kv_slow(backend, meta, seed):
    _check_append(backend, meta, seed)


@pytest.mark.slow
@needs_triton
@SLOW_TRITON
@given(meta=forests(), seed=st.integers(0, 2**16))
def test_fuzz_append_paged_kv_triton_slow(meta, seed):
    _check_append("triton", meta, seed)


# ------------------------------------------------------------------------------ invalid metadata
def _replace(meta: ForestMetadata, **kw) -> ForestMetadata:
    return ForestMetadata(**{**{f: getattr(meta, f) for f in meta.__dataclass_fields__}, **kw})


def _set(t: torch.Tensor, i: int, value: int) -> torch.Tensor:
    t = t.clone()
    t[i] = value
    return t


@st.composite
def broken(draw):
    """(metadata with one thing broken, field names an error may name)."""
    meta = draw(forests(max_ops=4, max_len=10))
    N, P, V = meta.num_nodes, meta.node_page_indices.numel(), meta.vis_nodes.numel()
    kinds = ["node_len_neg", "node_len_long", "indptr_dtype", "vis_indptr_short", "qo_decreasing",
             "page_indptr_short", "qo_too_many"]
    if P:
        kinds += ["page_oob", "page_neg", "page_indices_short"]
    if V:
        kinds += ["vis_oob", "vis_neg", "vis_dup"]
    kind = draw(st.sampled_from(kinds))
    i = draw(st.integers(0, 10**6))
    big = draw(st.sampled_from([NUM_PAGES, NUM_PAGES + 7, 2**31 - 1]))
    if kind == "page_oob":
        return _replace(meta, node_page_indices=_set(meta.node_page_indices, i % P, big)), {
            "node_page_indices"}
    if kind == "page_neg":
        return _replace(meta, node_page_indices=_set(meta.node_page_indices, i % P, -1)), {
            "node_page_indices"}
    if kind == "page_indices_short":
        return _replace(meta, node_page_indices=meta.node_page_indices[:-1]), {"node_page_indptr"}
    if kind == "vis_oob":
        return _replace(meta, vis_nodes=_set(meta.vis_nodes, i % V, N + i % 3)), {"vis_nodes"}
    if kind == "vis_neg":
        return _replace(meta, vis_nodes=_set(meta.vis_nodes, i % V, -1 - i % 2)), {"vis_nodes"}
    if kind == "vis_dup":
        vi = meta.vis_indptr.tolist()
        g = [g for g in range(meta.num_groups) if vi[g + 1] - vi[g] >= 2]
        if not g:
            return _replace(meta, vis_nodes=_set(meta.vis_nodes, 0, N)), {"vis_nodes"}
        g = g[i % len(g)]
        return _replace(meta, vis_nodes=_set(meta.vis_nodes, vi[g], int(meta.vis_nodes[vi[g] + 1]))), {
            "vis_nodes"}
    if kind == "node_len_neg":
        return _replace(meta, node_len=_set(meta.node_len, i % N, -1 - i % 5)), {"node_len"}
    if kind == "node_len_long":
        n = i % N
        return _replace(meta, node_len=_set(meta.node_len, n, int(meta.node_len[n]) + meta.page_size * 64)), {
            "node_page_indptr"}
    if kind == "indptr_dtype":
        f = draw(st.sampled_from(["node_page_indptr", "node_len", "qo_indptr", "vis_indptr", "vis_nodes"]))
        return _replace(meta, **{f: getattr(meta, f).long()}), {f}
    if kind == "vis_indptr_short":
        return _replace(meta, vis_indptr=meta.vis_indptr[:-1]), {"vis_indptr"}
    if kind == "page_indptr_short":
        return _replace(meta, node_page_indptr=meta.node_page_indptr[:-1]), {"node_page_indptr"}
    if kind == "qo_decreasing":
        qo = meta.qo_indptr.clone()
        qo[0] = 1
        return _replace(meta, qo_indptr=qo), {"qo_indptr"}
    # the last group gets more query rows than its own node has tokens
    qo = meta.qo_indptr.clone()
    own = int(meta.vis_nodes[-1]) if meta.num_groups and V else -1
    qo[-1] += (int(meta.node_len[own]) if own >= 0 else 0) + 1 + i % 3
    return _replace(meta, qo_indptr=qo), {"qo_indptr", "vis_nodes"}


def _check_broken(backend, case):
    meta, names = case
    q = torch.randn(max(int(meta.qo_indptr[-1]), 0), 2, 64) if meta.qo_indptr.dtype == torch.int32 else \
        torch.randn(3, 2, 64)
    k = torch.randn(NUM_PAGES, meta.page_size, 1, 64)
    with pytest.raises(MetadataError) as ei:
        mk.tree_attention(q, k, k, meta, backend=backend)
    named = str(ei.value).split(":")[0]
    assert named in names, (str(ei.value), names)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(case=broken())
def test_fuzz_invalid_metadata(backend, case):
    _check_broken(backend, case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=broken())
def test_fuzz_invalid_metadata_slow(backend, case):
    _check_broken(backend, case)
