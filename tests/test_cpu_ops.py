"""C++ CPU backend (multiverse_kernels._C) against the reference, on fresh random forests.

Outputs are poisoned with NaN inside the extension before every run (MULTIVERSE_DEBUG_POISON=1), so an
element a kernel forgets to write fails the comparison. Skipped with a visible reason when the
extension is not built, unless MULTIVERSE_REQUIRE_CPP=1 (CI sets it: there a missing build fails).
"""

from __future__ import annotations

import pytest
import torch

from multiverse_kernels.backends import available_backends, resolve
from multiverse_kernels.metadata import ForestMetadata
from multiverse_kernels.ops import append_paged_kv, merge_states, tree_attention
from multiverse_kernels.planning import plan_kv_tokens, plan_tree_attention
from multiverse_kernels.testing import (
    import_cpu_backend_or_skip,
    make_inputs,
    multiverse_forest,
    random_forest,
    sampling_forest,
    tolerance,
)

cpu_backend = import_cpu_backend_or_skip()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MULTIVERSE_DEBUG_POISON", "1")


def _check_attention(meta: ForestMetadata, num_pages: int, hq: int, hk: int, d: int, dtype: torch.dtype,
                     seed: int, plan=None, k_view: bool = False) -> None:
    q, k, v = make_inputs(meta, num_pages, hq, hk, d, dtype, seed=seed)
    if k_view:  # caches with padded slot/page strides (head_dim still contiguous)
        kb = torch.randn(k.shape[0], k.shape[1], hk, d + 16).to(dtype)
        vb = torch.randn(k.shape[0], k.shape[1], hk, d + 16).to(dtype)
        kb[..., :d] = k
        vb[..., :d] = v
        k, v = kb[..., :d], vb[..., :d]
    scale = d ** -0.5
    out, lse = tree_attention(q, k, v, meta, return_lse=True, backend="cpu", plan=plan)
    ref_out, ref_lse = tree_attention(q, k.contiguous(), v.contiguous(), meta, return_lse=True,
                                      backend="reference", sm_scale=scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float(), ref_out.float(), **tolerance(dtype))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_forests(seed: int, dtype: torch.dtype) -> None:
    page_size = [1, 4, 16][seed % 3]
    hq, hk = [(4, 4), (8, 2), (8, 1), (6, 3)][seed % 4]
    d = [64, 128, 256, 48, 80, 128][seed]
    f, groups = random_forest(1000 + seed, page_size=page_size)
    meta = f.metadata(groups)
    _check_attention(meta, f.num_pages, hq, hk, d, dtype, seed)


@pytest.mark.parametrize("seed", range(4))
def test_own_full_and_strided_caches(seed: int) -> None:
    f, groups = random_forest(2000 + seed, page_size=[1, 16][seed % 2], max_q_len=6)
    meta = f.metadata(groups).with_own_full(seed % 2 == 0)
    _check_attention(meta, f.num_pages, 8, 2, 64, torch.float32, seed, k_view=True)


@pytest.mark.parametrize("chunk,tile", [(1, 1), (5, 2), (16, 3)])
def test_user_plan_split_chunks_and_tiles(chunk: int, tile: int) -> None:
    """A caller's plan with tiny chunks and reader tiles: many partials per row, merged in C++."""
    f, groups = random_forest(3000 + chunk, page_size=4, max_len=40)
    meta = f.metadata(groups)
    plan = plan_tree_attention(meta, 8, 2, chunk_tokens=chunk, rows_per_tile=tile, head_dim=64)
    _check_attention(meta, f.num_pages, 8, 2, 64, torch.float32, chunk, plan=plan)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_nodes_split_by_default_chunk(dtype: torch.dtype) -> None:
    f, groups = multiverse_forest(prefix=600, paths=3, path_len=300, concl_len=3, page_size=16)
    meta = f.metadata(groups)
    _check_attention(meta, f.num_pages, 8, 2, 128, dtype, 7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_bytes_hook_reads_each_node_once(dtype: torch.dtype) -> None:
    """The kernel's own load counter equals the forest's unique visible KV bytes (each node once)."""
    hook = resolve("tree_attention_kv_bytes", "cpu", torch.device("cpu"))
    for f, groups in (sampling_forest(prompt=300, samples=16, gen_len=9),
                      multiverse_forest(prefix=520, paths=4, path_len=40, concl_len=3),
                      random_forest(5, page_size=1)):
        meta = f.metadata(groups)
        q, k, v = make_inputs(meta, f.num_pages, 8, 2, 64, dtype)
        got = hook(q, k, v, meta, 0.125)
        want = plan_kv_tokens(meta) * 2 * 2 * 64 * k.element_size()
        assert got == want


def test_non_contiguous_q() -> None:
    f, groups = random_forest(12, page_size=4)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 64)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # head_dim strided
    out = tree_attention(qt, k, v, meta, backend="cpu")
    torch.testing.assert_close(out, tree_attention(q, k, v, meta, backend="reference"), **tolerance(q.dtype))


@pytest.mark.parametrize("seed", range(12))
def test_cpp_planner_matches_planning_py(seed: int) -> None:
    """csrc/plan.cpp (for C++ callers) builds exactly the arrays of multiverse_kernels.planning."""
    f, groups = random_forest(6000 + seed, page_size=[1, 4, 16][seed % 3], max_len=[24, 90][seed % 2],
                              max_q_len=[1, 5, 30][seed % 3])
    meta = f.metadata(groups)
    if seed % 4 == 3:
        meta = meta.with_own_full(torch.arange(meta.num_groups) % 2 == 0)
    chunk, tile = [(512, 16), (7, 3), (1, 1), (32, 100), (None, 5)][seed % 5]
    ref = plan_tree_attention(meta, 8, 2, chunk_tokens=chunk, rows_per_tile=tile, num_workers=7,
                              impl="torch")
    ts, ints = torch.ops.multiverse_C.plan_tree_attention(meta.node_len, meta.qo_indptr, meta.vis_indptr,
                                                          meta.vis_nodes, meta.own_full, chunk or 0, tile,
                                                          4, 2, 7)
    assert ints.tolist() == ref.ints()
    for name, got, want in zip(ref.TENSOR_FIELDS, ts, ref.tensors(), strict=True):
        assert got.dtype == torch.int32, name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_tree_attention_op_same_schema(dtype: torch.dtype) -> None:
    """torch.ops.multiverse_C.tree_attention: the Python op's schema, planning inside (C++)."""
    f, groups = random_forest(8, page_size=4, max_q_len=6)
    meta = f.metadata(groups).with_own_full(torch.arange(len(groups)) % 3 == 0)
    q, k, v = make_inputs(meta, f.num_pages, 8, 2, 64, dtype)
    out, lse = torch.ops.multiverse_C.tree_attention(q, k, v, *meta.tensors(), meta.own_full, 0.125)
    ref_out, ref_lse = tree_attention(q, k, v, meta, sm_scale=0.125, return_lse=True, backend="reference")
    torch.testing.assert_close(out.float(), ref_out.float(), **tolerance(dtype))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_plan_cached_per_metadata() -> None:
    f, groups = random_forest(11)
    meta = f.metadata(groups)
    a = cpu_backend._plan(torch.empty(0, 8, 64), torch.empty(0, 4, 2, 64), meta)
    assert cpu_backend._plan(torch.empty(0, 8, 64), torch.empty(0, 4, 2, 64), meta) is a
    meta.node_len.add_(0)  # in-place edit bumps the version counter: the plan is rebuilt
    assert cpu_backend._plan(torch.empty(0, 8, 64), torch.empty(0, 4, 2, 64), meta) is not a


def test_auto_picks_cpu() -> None:
    assert available_backends("tree_attention", "cpu")[0] == "cpu"
    assert available_backends("merge_states", "cpu")[0] == "cpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("states", [1, 3])
def test_merge_states(dtype: torch.dtype, states: int) -> None:
    g = torch.Generator().manual_seed(states)
    v = torch.randn(37, states, 4, 80, generator=g).to(dtype)
    s = torch.randn(37, states, 4, generator=g) * 4
    s[::3, 0] = float("-inf")
    s[5] = float("-inf")  # a row with nothing: out 0, lse -inf
    out, lse = merge_states(v, s, backend="cpu")
    ref_out, ref_lse = merge_states(v, s, backend="reference")
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref_out.float(), **tolerance(dtype))
    torch.testing.assert_close(lse, ref_lse)
    assert torch.isneginf(lse[5]).all() and (out[5] == 0).all()


@pytest.mark.parametrize("src,cache", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                       (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                       (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("page_size", [1, 16])
def test_append_paged_kv(src: torch.dtype, cache: torch.dtype, page_size: int) -> None:
    f, groups = random_forest(21, page_size=page_size)
    indptr, indices = f.page_table()
    lens = [f.node_len(n) for n in range(f.num_nodes)]
    token_node = torch.tensor([n for n, ln in enumerate(lens) for _ in range(ln)], dtype=torch.int32)
    token_pos = torch.tensor([j for ln in lens for j in range(ln)], dtype=torch.int32)
    n = token_node.numel()
    k = torch.randn(n, 2, 64).to(src)
    v = torch.randn(n, 2, 64).to(src)
    shape = (f.num_pages, page_size, 2, 64)
    kc = torch.full(shape, float("nan"), dtype=cache)
    vc = torch.full(shape, float("nan"), dtype=cache)
    kr, vr = kc.clone(), vc.clone()
    append_paged_kv(k, v, kc, vc, indptr, indices, token_node, token_pos, backend="cpu")
    append_paged_kv(k, v, kr, vr, indptr, indices, token_node, token_pos, backend="reference")
    assert torch.equal(kc.isnan(), kr.isnan())
    torch.testing.assert_close(kc, kr, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(vc, vr, equal_nan=True, atol=0, rtol=0)


def test_float16_conversions_match_torch() -> None:
    """The extension's own fp16/bf16 conversions (bit tricks) round like torch, incl. subnormals."""
    x = torch.cat([torch.randn(4000) * 10.0 ** torch.randint(-9, 5, (4000,)),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, 6e-8, 3e-8, 2.9e-8,
                                 float("inf"), float("-inf")])])
    x = x.view(-1, 1, 1).repeat(1, 1, 16)
    ps = torch.full((x.shape[0],), 1, dtype=torch.int32)
    for dt in (torch.float16, torch.bfloat16):
        kc = torch.empty(x.shape[0], 1, 1, 16, dtype=dt)
        vc = torch.empty_like(kc)
        indptr = torch.arange(x.shape[0] + 1, dtype=torch.int32)
        idx = torch.arange(x.shape[0], dtype=torch.int32)
        append_paged_kv(x, x, kc, vc, indptr, idx, idx, ps - 1, backend="cpu")
        assert torch.equal(kc.view(-1, 16).view(torch.int16), x.view(-1, 16).to(dt).view(torch.int16))


def test_bad_plan_names_argument() -> None:
    f, groups = random_forest(3)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 64)
    plan = plan_tree_attention(meta, 4, 2, head_dim=64)
    ts = plan.tensors()
    ts[0] = ts[0].long()
    with pytest.raises(RuntimeError, match="reader_row"):
        torch.ops.multiverse_C.tree_attention_run(q, k, v, meta.node_page_indptr, meta.node_page_indices,
                                                  ts, plan.ints(), 0.1, None)
    with pytest.raises(RuntimeError, match="plan_tensors"):
        torch.ops.multiverse_C.tree_attention_run(q, k, v, meta.node_page_indptr, meta.node_page_indices,
                                                  ts[:3], plan.ints(), 0.1, None)


def test_opcheck_multiverse_C_ops() -> None:
    f, groups = random_forest(4, page_size=4)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 64)
    plan = plan_tree_attention(meta, 4, 2, head_dim=64)
    torch.library.opcheck(torch.ops.multiverse_C.tree_attention_run.default,
                          (q, k, v, meta.node_page_indptr, meta.node_page_indices, plan.tensors(),
                           plan.ints(), 0.125, None),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.multiverse_C.tree_attention.default,
                          (q, k, v, *meta.tensors(), None, 0.125),
                          test_utils=("test_schema", "test_faketensor"))
    vv = torch.randn(5, 2, 4, 64)
    ss = torch.randn(5, 2, 4)
    torch.library.opcheck(torch.ops.multiverse_C.merge_states.default, (vv, ss))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24))
def test_fuzz_random_shapes(seed: int) -> None:
    """Wider sweep: random forests with long nodes and extends, every dtype, head dims incl. odd ones,
    GQA ratios 1-8, page sizes 1-32, own_full on some groups."""
    import random

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
    _check_attention(meta, f.num_pages, hq, hk, d, dtype, seed)


def test_long_extend_splits_reader_tiles() -> None:
    """An extend with more packed rows than one CPU item holds (MAX_ITEM_ROWS): readers split into
    tiles, merged per row."""
    f, groups = multiverse_forest(prefix=300, paths=2, path_len=600, concl_len=2, page_size=16)
    meta = f.metadata([(n, 600 if q == 1 and i < 2 else q) for i, (n, q) in enumerate(groups)])
    plan = cpu_backend._plan(torch.empty(0, 8, 64), torch.empty(0, 4, 2, 64), meta)
    assert plan.max_item_readers == cpu_backend.MAX_ITEM_ROWS // 4
    _check_attention(meta, f.num_pages, 8, 2, 64, torch.float32, 3)
