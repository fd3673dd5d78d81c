"""tree_attention_backward on every backend against the float64 reference backward (the spec), on fresh
random forests: fp32/fp16/bf16, head dims 64/128/256 (and 40 where the backend takes it), GQA ratios, page
sizes 1 and 16, joins, empty and one-token nodes, own_full groups, grad_lse, rows that see nothing, plans
that split nodes into many chunks and readers into many tiles, strided caches, packed training forests.

Every case runs on each backend of ``multiverse_kernels.testing.BACKENDS`` (skipped with the reason when
one cannot run here; a missing C++ build FAILS with ``MULTIVERSE_REQUIRE_CPP=1``).
``testing.check_tree_attention_backward`` poisons the outputs (NaN), runs the reference backward in float64
on the same rounded inputs, compares within ``testing.grad_tolerance(dtype)`` and checks that cache slots
no row sees get exactly 0. Backend-only tests (auto/autograd dispatch, opcheck of the C++ run op, named
argument errors, the Triton kernels' limits) are in tests/backends/test_cpu_backward.py and
tests/backends/test_triton_backward.py.
"""

from __future__ import annotations

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.ops import tree_attention_backward
from multiverse_kernels.testing import (
    assert_close_to_reference,
    backend_device,
    backend_params,
    check_tree_attention_backward,
    compact_pages,
    grad_tolerance,
    make_inputs,
    multiverse_forest,
    random_forest,
    sampling_forest,
    seen_slots,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GQA = ((2, 2), (4, 2), (4, 1), (8, 1))
HEAD_DIMS = (64, 128, 256)
PAGE_SIZES = (1, 4, 16)
BACKEND = backend_params()
# random forests per backend: seeds < 12 small forests over the head-dim x dtype grid (the interpreter's
# share), then 8 larger forests (max_len 40, extends up to 8) x 3 dtypes at head_dim 64 (not for the
# reference, whose float64 run is the truth: its low-precision runs are checked on the small grid)
SEEDS = {"reference": 12, "cpu": 36, "triton": 12, "cuda": 36}
_SLOW = pytest.mark.slow


def _seeds(counts: dict[str, int]) -> list:
    return [pytest.param(p.values[0], s, id=f"{p.id}-{s}", marks=p.marks)
            for p in BACKEND for s in range(counts[p.values[0]])]


def _forest(seed: int, page_size: int, own_full: bool = False, **kw) -> tuple[mk.ForestMetadata, int]:
    f, groups = random_forest(seed, page_size=page_size, **kw)
    m = f.metadata(groups)
    if own_full:
        m = m.with_own_full(torch.rand(m.num_groups, generator=torch.Generator().manual_seed(seed)) < 0.5)
    return compact_pages(m)


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


@pytest.mark.parametrize("backend,seed", _seeds(SEEDS))
def test_random_forests(backend, seed):
    if seed < 12:  # each seed picks one point of the grid (periods 3, 3, 3, 4 mixed by the seed)
        d = HEAD_DIMS[seed % 3]
        dtype = DTYPES[(seed // 3) % 3] if seed < 9 else (torch.float32, torch.float16)[seed % 2]
        hq, hk = GQA[seed % 4]
        f, groups = random_forest(seed, page_size=PAGE_SIZES[(seed // 2) % 3], max_len=20, max_nodes=8)
        meta, pages = compact_pages(f.metadata(groups))
        if seed % 4 == 3:
            meta = meta.with_own_full(torch.arange(meta.num_groups) % 2 == 0)
        check_tree_attention_backward(backend, meta, pages, hq, hk, d, dtype, seed=seed,
                                      sm_scale=0.7 / d ** 0.5, with_lse=seed % 3 != 1)
    else:
        s, dtype = (seed - 12) // 3, DTYPES[(seed - 12) % 3]
        hq, hk = [(8, 2), (4, 4), (4, 1), (6, 2)][s % 4]
        meta, pages = _forest(s, [1, 16][s % 2], own_full=s % 3 == 0, max_len=40, max_q_len=8)
        check_tree_attention_backward(backend, meta, pages, hq, hk, 64, dtype, seed=s, with_lse=s % 2 == 0)


HEAD_DIM_CASES = [pytest.param(p.values[0], d, dt, id=f"{p.id}-{d}-{dt}",
                               marks=[*p.marks, *([_SLOW] if d == 256 and dt != torch.float32 else [])])
                  for p in backend_params(interp_slow=True) for d in (64, 128, 256, 40) for dt in DTYPES
                  if not (p.values[0] == "triton" and d == 40)]


@pytest.mark.parametrize("backend,d,dtype", HEAD_DIM_CASES)
def test_head_dims(backend, d, dtype):
    """Head dims 64/128/256 and one that is not a multiple of the vector width (40; not triton, which
    takes 64/128/256)."""
    meta, pages = _forest(20 + d, 16, max_len=60, max_q_len=6)
    check_tree_attention_backward(backend, meta, pages, 4, 2, d, dtype, seed=d)


@pytest.mark.parametrize("backend", backend_params(only=("cpu",)))
@pytest.mark.parametrize("chunk,tile", [(1, 1), (5, 2), (16, 3), (300, 1)])
def test_plans_split_chunks_and_tiles(backend, chunk, tile):
    """Any plan of the forest gives the same gradients: one-token chunks, readers split into tiles of
    one to three (several items add into the same dK/dV slots and every dq row). Only the C++ backward
    takes a caller's plan."""
    meta, pages = _forest(7, 4, own_full=True, max_len=40, max_q_len=8)
    check_tree_attention_backward(backend, meta, pages, 8, 2, 64, torch.float32, seed=7,
                                  plan=dict(chunk_tokens=chunk, rows_per_tile=tile))


def _packed(trunk_len: int, path_lens: tuple[int, ...], concl_len: int, page_size: int):
    f = mk.KVForest(4096, page_size)
    trunk = f.new_sequence(trunk_len)
    paths = f.fork(trunk, len(path_lens))
    for p, n in zip(paths, path_lens, strict=True):
        f.append(p, n)
    concl = f.join(paths)
    f.append(concl, concl_len)
    return compact_pages(f.metadata([(trunk, trunk_len)] + [(p, f.node_len(p)) for p in paths]
                                    + [(concl, concl_len)]))


@pytest.mark.parametrize("backend", BACKEND)
@pytest.mark.parametrize("page_size,dtype,d", [(1, torch.float32, 64), (16, torch.float16, 128),
                                               (16, torch.float32, 64)])
def test_packed_training_sequence(backend, page_size, dtype, d):
    """Training: every node its own group with q_len = node_len (Multiverse trunk, paths, conclusion).
    The trunk is longer than one dK/dV chunk and has more readers than one row tile, so chunks past
    a tile's causal limit are skipped and reader tiles loop."""
    meta, pages = _packed(70, (9, 1, 20), 6, page_size)
    check_tree_attention_backward(backend, meta, pages, 4, 2, d, dtype, seed=page_size)


@pytest.mark.parametrize("backend,dtype", [
    pytest.param(p.values[0], dt, id=f"{p.id}-{dt}",
                 marks=[*p.marks, *([] if dt == torch.float32 else [_SLOW])])
    for p in backend_params(interp_slow=True, exclude=("reference",)) for dt in DTYPES])
def test_packed_training_forest(backend, dtype):
    """Packed training (every node its own group, q_len = node_len, page size 1): a 700-token trunk,
    three 260-token paths and a 90-token conclusion joining them; the CPU plan gives each node's rows
    the whole node (no partial states), so the backward walks it in several 256-token sub-chunks, and
    the trunk's 1570 readers are split into several tiles. (Not the reference: it does not chunk, and
    its float64 run is the truth.)"""
    meta, pages = _packed(700, (260, 260, 260), 90, 1)
    check_tree_attention_backward(backend, meta, pages, 8, 2, 64, dtype, seed=3)


@pytest.mark.parametrize("backend", BACKEND)
def test_shared_prefix_many_readers(backend):
    """A prompt read by 16 decode rows x GQA 4 (64 packed rows: two dK/dV row tiles)."""
    f, groups = sampling_forest(prompt=20, samples=16, gen_len=2, page_size=16)
    check_tree_attention_backward(backend, f.metadata(groups), f.num_pages, 8, 2, 64, torch.float16)
    f, groups = multiverse_forest(prefix=12, paths=3, path_len=4, concl_len=3, concl_q=2, page_size=1)
    check_tree_attention_backward(backend, f.metadata(groups), f.num_pages, 4, 1, 64, torch.float32)


@pytest.mark.parametrize("backend", BACKEND)
def test_rows_that_see_nothing_and_strided_caches(backend):
    meta, pages = _forest(5, 16, max_len=40, max_q_len=8)
    check_tree_attention_backward(backend, meta, pages, 8, 2, 64, torch.float32, seed=5, dead_rows=3,
                                  k_view=True, sm_scale=0.3)


@pytest.mark.parametrize("backend", BACKEND)
def test_empty_nodes_and_groups(backend):
    """Empty nodes, q_len-0 groups and a row whose lse is -inf (its grad_lse ignored): no NaN; a step
    with no rows gives an empty dq and zero dk/dv."""
    f = mk.KVForest(32, 4)
    root = f.new_sequence(5)
    e = f.fork(root, 1)[0]  # empty node
    c = f.fork(e, 1)[0]
    f.append(c, 2)
    meta = f.metadata([(e, 0), (c, 2)])
    check_tree_attention_backward(backend, meta, f.num_pages, 2, 2, 64, torch.float32)
    check_tree_attention_backward(backend, meta, f.num_pages, 2, 2, 64, torch.float32, dead_rows=1)
    dev = backend_device(backend)
    no_rows = f.metadata([(c, 0)]).to(dev)
    q, k, v = make_inputs(no_rows, f.num_pages, 2, 2, 64, torch.float16, device=dev)
    out = torch.zeros(0, 2, 64, dtype=torch.float16, device=dev)
    lse = torch.zeros(0, 2, device=dev)
    dq, dk, dv = tree_attention_backward(out, q, k, v, out, lse, no_rows, backend=backend)
    assert dq.shape == (0, 2, 64) and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("backend", BACKEND)
def test_unseen_slots_get_zero_seen_slots_do_not(backend):
    meta, pages = _forest(2, 1, max_len=30, max_q_len=4)
    (_, dk, dv), _ = check_tree_attention_backward(backend, meta, pages, 4, 2, 64, torch.float32, seed=2)
    seen = seen_slots(meta, dk.shape[0] * dk.shape[1])
    for t in (dk, dv):
        flat = t.cpu().reshape(-1, *t.shape[2:])
        assert bool((flat[~seen] == 0).all()) and bool(flat[seen].abs().sum((1, 2)).gt(0).all())


@pytest.mark.parametrize("backend", backend_params(interp_slow=True))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_matches_reference(backend, dtype):
    """Gradients of q, k_cache, v_cache through ``tree_attention(backend=...)``'s autograd (out only)
    against the float64 reference's autograd."""
    dev = backend_device(backend)
    f, groups = random_forest(55, page_size=16, max_len=40, max_nodes=8)
    meta, pages = compact_pages(f.metadata(groups))
    q, k, v = make_inputs(meta, pages, 8, 2, 128, dtype, seed=3)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    grads = []
    for b, d, ty in ((backend, dev, dtype), ("reference", "cpu", torch.float64)):
        qq, kk, vv = (t.detach().to(d, ty).requires_grad_() for t in (q, k, v))
        mk.tree_attention(qq, kk, vv, meta.to(d), backend=b).backward(go.to(d, ty))
        grads.append([t.grad for t in (qq, kk, vv)])
    tol = grad_tolerance(dtype)
    scale = max(float(g.abs().max()) for g in grads[1])
    for name, a, b, like in zip(("dq", "dk", "dv"), *grads, (q, k, v), strict=True):
        assert_close_to_reference(name, a, b, like=like, atol=tol["atol"] * max(scale, 1.0), rtol=tol["rtol"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKEND)
@pytest.mark.parametrize("seed", range(12, 36))
def test_random_forests_sweep(backend, seed):
    """Larger forests, page sizes up to 32, GQA up to 16."""
    d = HEAD_DIMS[seed % 3]
    dtype = DTYPES[(seed // 3) % 3]
    page_size = (1, 4, 16, 32)[seed % 4]
    hq, hk = ((2, 2), (4, 2), (8, 2), (8, 1), (16, 1))[(seed // 2) % 5]
    f, groups = random_forest(seed, page_size=page_size, max_len=48, max_nodes=12)
    meta, pages = compact_pages(f.metadata(groups))
    check_tree_attention_backward(backend, meta, pages, hq, hk, d, dtype, seed=seed)
