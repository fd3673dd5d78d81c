"""The fused C++ backward of tree_attention (csrc/cpu/tree_attention_backward.cpp) against the reference
backward (the specification) on fresh random forests: fp32/fp16/bf16, head dims 64/128/256, GQA ratios,
page sizes 1 and 16, joins, empty and one-token nodes, own_full groups, grad_lse, rows that see nothing,
plans that split nodes into many chunks and readers into many tiles, strided caches, and autograd
through ``tree_attention`` picking it. The reference runs in float64 on the same (rounded) inputs.

Workspaces are NaN-poisoned (MULTIVERSE_DEBUG_POISON=1) like the forward's tests. Skipped with a visible
reason when the extension is not built, unless MULTIVERSE_REQUIRE_CPP=1 (CI: a missing build fails).
"""

from __future__ import annotations

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.backends import available_backends
from multiverse_kernels.backends.reference.tree_attention_backward import tree_attention_backward as ref_bw
from multiverse_kernels.metadata import ForestMetadata
from multiverse_kernels.ops import tree_attention_backward
from multiverse_kernels.planning import plan_tree_attention
from multiverse_kernels.testing import import_cpu_backend_or_skip, make_inputs, random_forest, tolerance

cpu_backend = import_cpu_backend_or_skip()
from multiverse_kernels.backends.cpu._ext import run_tree_attention_backward  # noqa: E402 (after the skip)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MULTIVERSE_DEBUG_POISON", "1")


def _grad_tol(dtype: torch.dtype) -> dict[str, float]:
    # gradients are sums over many keys of products of rounded inputs: twice the forward's tolerance
    return {k: 2 * v for k, v in tolerance(dtype).items()}


def _check(meta: ForestMetadata, num_pages: int, hq: int, hk: int, d: int, dtype: torch.dtype, seed: int,
           *, with_lse: bool = True, plan=None, k_view: bool = False, dead_rows: int = 0,
           sm_scale: float | None = None) -> None:
    q, k, v = make_inputs(meta, num_pages, hq, hk, d, dtype, seed=seed)
    sm = d ** -0.5 if sm_scale is None else sm_scale
    out, lse = mk.tree_attention(q, k, v, meta, return_lse=True, backend="cpu", sm_scale=sm)
    g = torch.Generator().manual_seed(seed + 100)
    go = torch.randn(out.shape, generator=g).to(dtype)
    gl = torch.randn(lse.shape, generator=g) if with_lse else None
    if dead_rows:  # rows that see nothing (lse = -inf, out = 0): only callers of the op can make them
        dead = torch.zeros(q.shape[0], dtype=torch.bool)
        dead[torch.randperm(q.shape[0], generator=g)[:dead_rows]] = True
        out = out.masked_fill(dead[:, None, None], 0)
        lse = lse.masked_fill(dead[:, None], float("-inf"))
    kk, vv = k, v
    if k_view:  # caches with padded slot/page strides (head_dim still contiguous)
        kb = torch.randn(k.shape[0], k.shape[1], hk, d + 16).to(dtype)
        vb = torch.randn(k.shape[0], k.shape[1], hk, d + 16).to(dtype)
        kb[..., :d] = k
        vb[..., :d] = v
        kk, vv = kb[..., :d], vb[..., :d]
    if plan is None:
        got = tree_attention_backward(go, q, kk, vv, out, lse, meta, grad_lse=gl, sm_scale=sm, backend="cpu")
    else:
        got = run_tree_attention_backward(go, gl, q, kk, vv, out, lse, meta, sm, plan)
    f64 = [t.double() for t in (go, q, k, v, out)]
    want = ref_bw(f64[0], gl, f64[1], f64[2], f64[3], f64[4], lse, meta, sm)
    scale = max(float(w.abs().max()) for w in want) if q.shape[0] else 1.0
    for name, a, b, like in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert a.dtype == dtype and a.shape == like.shape, name
        assert bool(torch.isfinite(a).all()), f"{name}: non-finite gradient"
        tol = _grad_tol(dtype)
        torch.testing.assert_close(a.double(), b, atol=tol["atol"] * max(scale, 1.0), rtol=tol["rtol"],
                                   msg=f"{name} ({dtype}, d={d}, hq={hq}, hk={hk})")
    if dead_rows:
        assert bool((got[0][dead] == 0).all()), "dq of a row that sees nothing"


def _forest(seed: int, page_size: int, own_full: bool = False, **kw) -> tuple[ForestMetadata, int]:
    f, groups = random_forest(seed, page_size=page_size, **kw)
    m = f.metadata(groups)
    if own_full:
        m = m.with_own_full(torch.rand(m.num_groups, generator=torch.Generator().manual_seed(seed)) < 0.5)
    return m, f.num_pages


def test_forests_cover_the_shapes():
    """The seeds below hold empty and one-token nodes, joins, extend groups and groups with no rows."""
    empty = one = joins = extend = idle = 0
    for seed in range(8):
        f, groups = random_forest(seed, page_size=16, max_len=40, max_q_len=8)
        lens = [f.node_len(n) for n in range(f.num_nodes)]
        empty += lens.count(0)
        one += lens.count(1)
        extend += sum(q > 1 for _, q in groups)
        idle += sum(q == 0 for _, q in groups)
        for n in range(f.num_nodes):
            before = [tuple(f.visibility(a)[:-1]) for a in f.visibility(n)]
            joins += len(before) != len(set(before))
    assert empty and one and joins and extend and idle, (empty, one, joins, extend, idle)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_forests(seed: int, dtype: torch.dtype) -> None:
    hq, hk = [(8, 2), (4, 4), (4, 1), (6, 2)][seed % 4]
    m, pages = _forest(seed, [1, 16][seed % 2], own_full=seed % 3 == 0, max_len=40, max_q_len=8)
    _check(m, pages, hq, hk, 64, dtype, seed, with_lse=seed % 2 == 0)


_SLOW = pytest.mark.slow
HEAD_DIM_CASES = [pytest.param(d, dt, marks=_SLOW if d == 256 and dt != torch.float32 else (), id=f"{d}-{dt}")
                  for d in (64, 128, 256, 40) for dt in DTYPES]


@pytest.mark.parametrize("d,dtype", HEAD_DIM_CASES)
def test_head_dims(d: int, dtype: torch.dtype) -> None:
    """Head dims 64/128/256 and one that is not a multiple of the vector width (40)."""
    m, pages = _forest(20 + d, 16, max_len=60, max_q_len=6)
    _check(m, pages, 4, 2, d, dtype, d)


@pytest.mark.parametrize("chunk,tile", [(1, 1), (5, 2), (16, 3), (300, 1)])
def test_plans_split_chunks_and_tiles(chunk: int, tile: int) -> None:
    """Any plan of the forest gives the same gradients: one-token chunks, readers split into tiles of
    one to three (several items add into the same dK/dV slots and every dq row)."""
    m, pages = _forest(7, 4, own_full=True, max_len=40, max_q_len=8)
    plan = plan_tree_attention(m, 8, 2, chunk_tokens=chunk, rows_per_tile=tile)
    _check(m, pages, 8, 2, 64, torch.float32, 7, plan=plan)


@pytest.mark.parametrize("dtype", [torch.float32] + [pytest.param(dt, marks=_SLOW) for dt in DTYPES[1:]],
                         ids=str)
def test_packed_training_forest(dtype: torch.dtype) -> None:
    """Packed training (every node its own group, q_len = node_len, page size 1): a 700-token trunk,
    three 260-token paths and a 90-token conclusion joining them; the CPU plan gives each node's rows
    the whole node (no partial states), so the backward walks it in several 256-token sub-chunks, and
    the trunk's 1570 readers are split into several tiles."""
    f = mk.KVForest(700 + 3 * 260 + 90, 1)
    trunk = f.new_sequence(700)
    kids = f.fork(trunk, 3)
    for kid in kids:
        f.append(kid, 260)
    c = f.join(kids)
    f.append(c, 90)
    m = f.metadata([(trunk, 700)] + [(kid, 260) for kid in kids] + [(c, 90)])
    _check(m, f.num_pages, 8, 2, 64, dtype, 3)


def test_rows_that_see_nothing_and_strided_caches() -> None:
    m, pages = _forest(5, 16, max_len=40, max_q_len=8)
    _check(m, pages, 8, 2, 64, torch.float32, 5, dead_rows=3, k_view=True, sm_scale=0.3)


def test_unseen_slots_get_zero() -> None:
    m, pages = _forest(2, 1, max_len=30, max_q_len=4)
    q, k, v = make_inputs(m, pages, 4, 2, 64, torch.float32, seed=2)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True, backend="cpu")
    _, dk, dv = tree_attention_backward(torch.randn_like(out), q, k, v, out, lse, m, backend="cpu")
    seen = torch.zeros(k.shape[0] * k.shape[1], dtype=torch.bool)
    qo, vi, vis = m.qo_indptr.tolist(), m.vis_indptr.tolist(), m.vis_nodes.tolist()
    for g in range(m.num_groups):
        if qo[g + 1] > qo[g]:
            for n in vis[vi[g]:vi[g + 1]]:
                seen[m.node_token_slots(n)] = True
    for t in (dk, dv):
        flat = t.reshape(-1, *t.shape[2:])
        assert bool((flat[~seen] == 0).all()) and bool(flat[seen].abs().sum((1, 2)).gt(0).all())


def test_auto_and_autograd_use_the_cpu_backward(monkeypatch) -> None:
    """backend="auto" resolves the backward to the C++ kernel, and tree_attention's autograd (any
    forward backend on CPU tensors) calls it."""
    assert available_backends("tree_attention_backward", "cpu")[0] == "cpu"
    calls = []
    real = cpu_backend.run_tree_attention_backward

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(cpu_backend, "run_tree_attention_backward", spy)
    m, pages = _forest(3, 16, max_len=40, max_q_len=8)
    q, k, v = make_inputs(m, pages, 8, 2, 64, torch.float32, seed=3)
    go = torch.randn(q.shape)
    for backend in ("auto", "cpu", "reference"):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        got = torch.autograd.grad((mk.tree_attention(*ins, m, backend=backend) * go).sum(), ins)
        out, lse = mk.tree_attention(q, k, v, m, return_lse=True, backend="reference")
        want = ref_bw(go.double(), None, q.double(), k.double(), v.double(), out.double(), lse, m, 64 ** -0.5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, **_grad_tol(torch.float32))
    # auto and cpu pick the C++ backward; an explicit reference forward keeps the reference backward
    assert len(calls) == 2


def test_opcheck() -> None:
    m, pages = _forest(4, 16, max_len=40, max_q_len=8)
    q, k, v = make_inputs(m, pages, 4, 2, 64, torch.float32, seed=4)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True, backend="cpu")
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.multiverse.tree_attention_backward.default,
                          (go, gl, q, k, v, out, lse, *m.tensors(), None, 0.125, "cpu", True))
    plan = cpu_backend._plan(q, k, m)
    torch.library.opcheck(torch.ops.multiverse_C.tree_attention_backward_run.default,
                          (go, gl, q, k, v, out, lse, m.node_page_indptr, m.node_page_indices,
                           plan.tensors(), plan.ints(), 0.125))


def test_bad_arguments_are_named() -> None:
    m, pages = _forest(4, 16, max_len=40, max_q_len=8)
    q, k, v = make_inputs(m, pages, 4, 2, 64, torch.float32, seed=4)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True, backend="cpu")
    plan = cpu_backend._plan(q, k, m)
    with pytest.raises(RuntimeError, match="lse"):
        run_tree_attention_backward(out, None, q, k, v, out, lse.double(), m, 0.1, plan)
    with pytest.raises(RuntimeError, match="grad_lse"):
        run_tree_attention_backward(out, lse[:1], q, k, v, out, lse, m, 0.1, plan)
    with pytest.raises(RuntimeError, match="grad_out"):
        run_tree_attention_backward(out[:1], None, q, k, v, out, lse, m, 0.1, plan)
