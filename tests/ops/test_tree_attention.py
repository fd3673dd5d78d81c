"""tree_attention (forward) on every backend against the float64 reference, on fresh random forests.

Every case runs on each backend of ``multiverse_kernels.testing.BACKENDS``: ``reference`` (also checked
against dense SDPA), ``cpu`` (the C++ extension; skipped with the reason when it is not built, FAILS then with
``MULTIVERSE_REQUIRE_CPP=1``), ``triton`` (CPU tensors in the interpreter, see tests/_triton_interp.py for
what it covers; CUDA tensors when compiled) and ``cuda`` (skipped with the reason without a GPU).
``testing.check_tree_attention`` poisons the outputs (NaN), runs the float64 reference on the same rounded
inputs and compares within ``testing.tolerance(dtype)``. Backend-only tests (ISA forcing, Triton launch
configs and errors, kv-byte counters, the C++ planner, CUDA graphs) are in tests/backends/test_cpu_ops.py,
tests/backends/test_cpu_isa.py, tests/backends/test_triton_attention.py, tests/backends/test_cuda_ops.py and
tests/backends/test_gpu.py."""

from __future__ import annotations

import random

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.testing import (
    BACKENDS,
    assert_close_to_reference,
    backend_device,
    backend_params,
    beam_forest,
    check_tree_attention,
    design_example_forest,
    eagle_tree_forest,
    lse_tolerance,
    make_inputs,
    multiverse_forest,
    poisoned_outputs,
    random_forest,
    sampling_forest,
    tolerance,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GQA = ((2, 2), (4, 2), (4, 1), (8, 1))  # ratios 1, 2, 4, 8
HEAD_DIMS = (64, 128, 256)
PAGE_SIZES = (1, 4, 16)
# head dims the Triton kernels do not take (tests/backends/test_triton_attention.py: a named error)
ODD_HEAD_DIMS = (48, 80)
# random forests per backend: seeds < 24 are small forests with caller plans (the interpreter's share),
# later ones default-sized forests, odd head dims (not triton), GQA up to 32/8, long extends
SEEDS = {"reference": 24, "cpu": 36, "triton": 24, "cuda": 96}
BACKEND = backend_params()


def _seeds(counts: dict[str, int]) -> list:
    return [pytest.param(p.values[0], s, id=f"{p.id}-{s}", marks=p.marks)
            for p in BACKEND for s in range(counts[p.values[0]])]


# Each seed picks one point of the grid (periods 3, 3, 4, 3 are mixed by the seed) so that 24 seeds
# cover every head_dim x dtype pair, every page size and GQA ratio, split chunks and several tiles.
@pytest.mark.parametrize("backend,seed", _seeds(SEEDS))
def test_random_forests(backend, seed):
    d = HEAD_DIMS[seed % 3]
    dtype = DTYPES[(seed // 3) % 3]
    page_size = PAGE_SIZES[(seed // 2) % 3]
    hq, hk = GQA[seed % 4]
    chunk = [8, 512, 5][seed % 3]
    rpt = [None, 2, 1][(seed // 3) % 3]
    sm_scale = 0.7 / d ** 0.5
    if seed < 24:
        f, groups = random_forest(seed, page_size=page_size, max_len=20, max_nodes=8)
    else:
        page_size = (1, 16, 4, 32)[seed % 4]
        hq, hk = ((4, 4), (8, 2), (8, 1), (32, 8), (6, 3))[seed % 5]
        if backend != "triton":
            d = (64, 128, 256, *ODD_HEAD_DIMS)[seed % 5]
        f, groups = random_forest(1000 + seed, page_size=page_size, max_q_len=[1, 4, 20, 70][seed % 4])
        sm_scale = None
        rpt = [None, 2, 1, 3][seed % 4]
    meta = f.metadata(groups)
    if seed % 5 == 4:
        meta = meta.with_own_full(torch.arange(meta.num_groups) % 2 == 0)
    plan = None if seed >= 24 and seed % 2 == 0 else dict(chunk_tokens=chunk, rows_per_tile=rpt)
    check_tree_attention(backend, meta, f.num_pages, hq, hk, d, dtype, seed=seed, plan=plan,
                         sm_scale=sm_scale)


@pytest.mark.parametrize("backend", BACKEND)
@pytest.mark.parametrize("kind", ["multiverse", "sampling", "beam", "eagle"])
def test_real_use_forests(backend, kind):
    f, groups = {
        "multiverse": lambda: multiverse_forest(prefix=40, paths=8, path_len=6, concl_len=3, concl_q=2),
        "sampling": lambda: sampling_forest(prompt=30, samples=16, gen_len=3),
        "beam": lambda: beam_forest(prompt=12, depth=4, width=16, step_len=2),
        "eagle": lambda: eagle_tree_forest(prefix=20, page_size=1),
    }[kind]()
    check_tree_attention(backend, f.metadata(groups), f.num_pages, 4, 1, 64, torch.float16)


@pytest.mark.parametrize("backend", BACKEND)
def test_default_plan_and_extend_own_full(backend):
    """No plan passed (the backend plans), extend with q_len = node_len (training-like), own_full."""
    f = mk.KVForest(64, 4)
    root = f.new_sequence(9)
    a, b = f.fork(root, 2)
    f.append(a, 7)
    f.append(b, 1)
    meta = f.metadata([(root, 9), (a, 7), (b, 1)])
    check_tree_attention(backend, meta, f.num_pages, 4, 2, 64, torch.float32)
    check_tree_attention(backend, meta.with_own_full(True), f.num_pages, 4, 2, 128, torch.float16)


# (chunk_tokens, rows_per_tile, dtype): one-token chunks, readers split into tiles of one to three, a tile
# larger than any node's readers (not triton: 100 rows x GQA 4 exceed its 64-row tile)
PLAN_CASES = [(1, 1, torch.float32), (5, 2, torch.float32), (16, 3, torch.float32), (6, 2, torch.float32),
              (7, 3, torch.float16), (64, 100, torch.float16)]


def _plan_params() -> list:
    """triton in the interpreter: (6, 2) in the default run (as before the tests were organised by op);
    the others take 5-70 s each there and are slow."""
    out = []
    for p, p_interp_slow in zip(BACKEND, backend_params(interp_slow=True), strict=True):
        for c, t, dt in PLAN_CASES:
            if not (p.id == "triton" and t == 100):
                marks = p.marks if c == 6 else p_interp_slow.marks
                out.append(pytest.param(p.id, c, t, dt, id=f"{p.id}-{c}-{t}-{str(dt)[6:]}", marks=marks))
    return out


@pytest.mark.parametrize("backend,chunk,tile,dtype", _plan_params())
def test_user_plan_and_capacity(backend, chunk, tile, dtype):
    """A caller's plan with tiny chunks and reader tiles (many partials per row, merged), and the same
    plan padded to a larger PlanCapacity (padding items with no readers, merge rows -1): same result."""
    from multiverse_kernels.planning import PlanCapacity, plan_tree_attention

    f, groups = random_forest(3000 + chunk, page_size=4, max_len=40, max_nodes=8 if tile == 2 else 12)
    meta = f.metadata(groups)
    d = 64 if dtype == torch.float32 else 128
    p = plan_tree_attention(meta, 8, 2, chunk_tokens=chunk, rows_per_tile=tile, head_dim=d)
    cap = PlanCapacity(p.num_readers + 3, p.num_items + 5, p.num_partials + 4, p.num_merge_rows + 3)
    out1, _ = check_tree_attention(backend, meta, f.num_pages, 8, 2, d, dtype, seed=chunk,
                                   plan=dict(chunk_tokens=chunk, rows_per_tile=tile))
    out2, _ = check_tree_attention(backend, meta, f.num_pages, 8, 2, d, dtype, seed=chunk,
                                   plan=dict(chunk_tokens=chunk, rows_per_tile=tile, capacity=cap))
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params(exclude=("triton",)))
@pytest.mark.parametrize("own_full", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_nodes_and_extends(backend, dtype, own_full):
    """Nodes longer than the default chunk (split into several items), an extend of 40 rows over them.
    (Not triton: too slow in the interpreter; its chunk splits are checked by test_random_forests.)"""
    f, groups = multiverse_forest(prefix=1500, paths=5, path_len=700, concl_len=40, page_size=16)
    meta = f.metadata([(n, min(q, 40) if q > 1 else q) for n, q in groups]).with_own_full(own_full)
    check_tree_attention(backend, meta, f.num_pages, 8, 2, 128, dtype, seed=7)


@pytest.mark.parametrize("backend", BACKEND)
@pytest.mark.parametrize("seed", range(4))
def test_own_full_and_strided_caches(backend, seed):
    f, groups = random_forest(2000 + seed, page_size=[1, 16][seed % 2], max_q_len=6)
    meta = f.metadata(groups).with_own_full(seed % 2 == 0)
    check_tree_attention(backend, meta, f.num_pages, 8, 2, 64, torch.float32, seed=seed, k_view=True)


@pytest.mark.parametrize("backend", BACKEND)
def test_non_contiguous_q(backend):
    f, groups = random_forest(12, page_size=4)
    check_tree_attention(backend, f.metadata(groups), f.num_pages, 4, 2, 64, torch.float32, q_view=True)


@pytest.mark.parametrize("backend", BACKEND)
def test_rows_that_see_nothing_and_empty_groups(backend):
    """Groups with q_len 0, empty nodes listed (no readers): rows still correct; no row is unwritten."""
    f = mk.KVForest(32, 4)
    root = f.new_sequence(5)
    e = f.fork(root, 1)[0]  # empty node
    c = f.fork(e, 1)[0]
    f.append(c, 2)
    meta = f.metadata([(e, 0), (c, 2)])
    check_tree_attention(backend, meta, f.num_pages, 2, 2, 64, torch.float32)
    dev = backend_device(backend)
    no_rows = f.metadata([(c, 0)]).to(dev)
    q, k, v = make_inputs(no_rows, f.num_pages, 2, 2, 64, torch.float16, device=dev)
    out, lse = mk.tree_attention(q, k, v, no_rows, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 64) and lse.shape == (0, 2)


@pytest.mark.parametrize("backend", backend_params(only=("cpu", "cuda")))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_tree_attention_op_plans_inside(backend, dtype):
    """torch.ops.multiverse_C.tree_attention (the C++ entry point, for C++ callers): the Python op's
    schema, planning inside (C++), on CPU (cpu) or CUDA (cuda) tensors."""
    dev = backend_device(backend)
    f, groups = random_forest(8, page_size=4, max_q_len=6)
    meta = f.metadata(groups).with_own_full(torch.arange(len(groups)) % 3 == 0)
    q, k, v = make_inputs(meta, f.num_pages, 8, 2, 64, dtype)
    m = meta.to(dev)
    with poisoned_outputs():
        out, lse = torch.ops.multiverse_C.tree_attention(q.to(dev), k.to(dev), v.to(dev), *m.tensors(),
                                                         m.own_full, 0.125)
    ref_out, ref_lse = mk.tree_attention(q.double(), k.double(), v.double(), meta, sm_scale=0.125,
                                         return_lse=True, backend="reference")
    assert_close_to_reference("out", out, ref_out, like=q, **tolerance(dtype))
    assert_close_to_reference("lse", lse, ref_lse, **lse_tolerance(dtype))


# ---- the reference itself (float64) against dense SDPA -----------------------------------------------

@pytest.mark.parametrize("seed", range(24))
def test_reference_random_forests_float64(seed):
    page_size = [1, 4, 16][seed % 3]
    hq, hk = [(4, 4), (4, 2), (8, 1), (8, 2)][seed % 4]
    f, groups = random_forest(seed, page_size=page_size)
    check_tree_attention("reference", f.metadata(groups), f.num_pages, hq, hk, [64, 128, 256][seed % 3],
                         torch.float64, seed=seed)


@pytest.mark.parametrize("seed", range(6))
def test_reference_random_forests_own_full(seed):
    f, groups = random_forest(100 + seed, page_size=4)
    check_tree_attention("reference", f.metadata(groups).with_own_full(True), f.num_pages, 4, 2, 64,
                         torch.float64, seed=seed)


@pytest.mark.parametrize("shape", [multiverse_forest, sampling_forest, beam_forest, eagle_tree_forest])
def test_reference_real_shapes(shape):
    f, groups = shape()
    check_tree_attention("reference", f.metadata(groups), f.num_pages, 8, 2, 128, torch.float64)


def test_worked_example_from_design():
    """docs/design.md §2: 10-token trunk, paths A (5) and B (3), conclusion C (2) joining them, page 4."""
    f, groups = design_example_forest()
    m = f.metadata(groups)
    assert m.node_page_indptr.tolist() == [0, 3, 5, 6, 7]
    assert m.node_page_indices.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert m.node_len.tolist() == [10, 5, 3, 2]
    assert m.qo_indptr.tolist() == [0, 1, 2, 4]
    assert m.vis_indptr.tolist() == [0, 2, 4, 8]
    assert m.vis_nodes.tolist() == [0, 1, 0, 2, 0, 1, 2, 3]
    mask = mk.dense_mask(m)  # keys: trunk 0-9, A 10-14, B 15-17, C 18-19
    assert mask[0].nonzero().flatten().tolist() == list(range(15))
    assert mask[1].nonzero().flatten().tolist() == list(range(10)) + [15, 16, 17]
    assert mask[2].nonzero().flatten().tolist() == list(range(19))
    assert mask[3].nonzero().flatten().tolist() == list(range(20))
    check_tree_attention("reference", m, f.num_pages, 4, 2, 64, torch.float64)


def test_reference_row_that_sees_nothing_is_zero_not_nan():
    """A group whose rows see only empty nodes cannot exist (q_len <= own len), but a row's own node may
    be the only non-empty one; here we force an empty visible set through an own_full empty group."""
    m = mk.ForestMetadata(
        node_page_indptr=torch.tensor([0, 1], dtype=torch.int32),
        node_page_indices=torch.tensor([0], dtype=torch.int32),
        node_len=torch.tensor([0], dtype=torch.int32),
        qo_indptr=torch.tensor([0, 0], dtype=torch.int32),
        vis_indptr=torch.tensor([0, 1], dtype=torch.int32),
        vis_nodes=torch.tensor([0], dtype=torch.int32),
        page_size=4,
    )
    q, k, v = make_inputs(m, 1, dtype=torch.float64)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)
    # Merging only empty states is the way an empty row arises inside kernels:
    o, s = mk.merge_states(torch.randn(3, 2, 4, 8), torch.full((3, 2, 4), float("-inf")))
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(s).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_low_precision_inputs_accumulate_in_fp32(dtype):
    f, groups = multiverse_forest(prefix=40, paths=3, path_len=9, page_size=16)
    check_tree_attention("reference", f.metadata(groups), f.num_pages, 4, 2, 64, dtype)


def test_reference_sm_scale_is_used():
    f, groups = sampling_forest(prompt=20, samples=3, gen_len=2, page_size=4)
    m = f.metadata(groups)
    a, _ = check_tree_attention("reference", m, f.num_pages, 4, 2, 64, torch.float64, sm_scale=0.3)
    q, k, v = make_inputs(m, f.num_pages, dtype=torch.float64)
    assert not torch.allclose(a, mk.tree_attention(q, k, v, m, backend="reference"))


# ---- slow sweeps ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKEND)
@pytest.mark.parametrize("seed", range(24, 60))
def test_random_forests_sweep(backend, seed):
    """Heavier sweep: larger forests, every (head_dim, dtype, page size, GQA) combination over seeds."""
    d = HEAD_DIMS[seed % 3]
    dtype = DTYPES[(seed // 3) % 3]
    page_size = (1, 4, 16, 32, 128)[seed % 5]
    hq, hk = ((2, 2), (4, 2), (8, 2), (8, 1), (16, 1))[(seed // 2) % 5]
    f, groups = random_forest(seed, page_size=page_size, max_len=48, max_nodes=12)
    from multiverse_kernels.backends.triton.tree_attention import MAX_BLOCK_M  # the same plans on all

    rpt = [None, min(3, max(1, MAX_BLOCK_M[d] // (hq // hk)))][seed % 2]
    check_tree_attention(backend, f.metadata(groups), f.num_pages, hq, hk, d, dtype, seed=seed,
                         plan=dict(chunk_tokens=[16, 512, 7][seed % 3], rows_per_tile=rpt))


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params(exclude=("triton",)))
@pytest.mark.parametrize("seed", range(24))
def test_fuzz_random_shapes(backend, seed):
    """Wider sweep: random forests with long nodes and extends, every dtype, head dims incl. odd ones
    (not triton: it takes 64/128/256), GQA ratios 1-8, page sizes 1-32, own_full on some groups."""
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 16, 32])
    hk = rng.choice([1, 2, 4])
    hq = hk * rng.choice([1, 2, 4, 8])
    d = rng.choice([16, 64, 72, 128, 256])
    dtype = rng.choice(DTYPES)
    f, groups = random_forest(5000 + seed, page_size=page_size, max_len=rng.choice([24, 300, 700]),
                              max_nodes=rng.choice([6, 12, 20]), max_q_len=rng.choice([1, 8, 40]))
    meta = f.metadata(groups)
    if seed % 3 == 0:
        meta = meta.with_own_full(torch.rand(meta.num_groups, generator=torch.Generator().manual_seed(seed))
                                  < 0.5)
    check_tree_attention(backend, meta, f.num_pages, hq, hk, d, dtype, seed=seed)


def test_every_backend_listed():
    assert [p.values[0] for p in BACKEND] == list(BACKENDS)
