"""C++ CPU backend (multiverse_kernels._C): what only it has (the C++ planner, its plan cache, kv-byte
counter, fp16/bf16 conversions, the multiverse_C ops' schemas and argument errors, reader tiles split at
MAX_ITEM_ROWS). Its comparisons with the reference on random forests are in tests/ops/test_<op>.py
(test_tree_attention.py, test_tree_attention_backward.py, test_merge_states.py, test_append_paged_kv.py).

Outputs are poisoned with NaN (the ``poisoned`` fixture), so an element a kernel forgets to write fails.
Skipped with a visible reason when the extension is not built, unless MULTIVERSE_REQUIRE_CPP=1 (CI sets
it: there a missing build fails).
"""

from __future__ import annotations

import pytest
import torch

from multiverse_kernels.backends import available_backends, resolve
from multiverse_kernels.ops import append_paged_kv
from multiverse_kernels.planning import plan_kv_tokens, plan_tree_attention
from multiverse_kernels.testing import (
    check_tree_attention,
    import_cpu_backend_or_skip,
    make_inputs,
    multiverse_forest,
    random_forest,
    sampling_forest,
)

cpu_backend = import_cpu_backend_or_skip()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("poisoned")


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


def test_long_extend_splits_reader_tiles() -> None:
    """An extend with more packed rows than one CPU item holds (MAX_ITEM_ROWS): readers split into
    tiles, merged per row."""
    f, groups = multiverse_forest(prefix=300, paths=2, path_len=600, concl_len=2, page_size=16)
    meta = f.metadata([(n, 600 if q == 1 and i < 2 else q) for i, (n, q) in enumerate(groups)])
    plan = cpu_backend._plan(torch.empty(0, 8, 64), torch.empty(0, 4, 2, 64), meta)
    assert plan.max_item_readers == cpu_backend.MAX_ITEM_ROWS // 4
    check_tree_attention("cpu", meta, f.num_pages, 8, 2, 64, torch.float32, seed=3)


@pytest.mark.parametrize("src,cache", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                       (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
                                       (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("page_size,hk,d", [(1, 2, 64), (16, 1, 128), (32, 4, 256)])
@pytest.mark.parametrize("head_major", [False, True])
def test_append_kv_slots_writes_exactly_its_slots(src, cache, page_size, hk, d, head_major) -> None:
    """multiverse_C.append_kv_slots (the vLLM backend's cache write): row i lands at page slot // page_size,
    row slot % page_size (cast like torch's .to), padding slots (-1) write nothing, every other cache
    element keeps its NaN; token-major and head-major (strided) caches."""
    from multiverse_kernels.bench.workloads import head_major as to_head_major

    g = torch.Generator().manual_seed(page_size * 131 + hk * 7 + d)
    pages, n = 18, 9
    kc = torch.full((pages, page_size, hk, d), float("nan"), dtype=cache)
    vc = torch.full_like(kc, float("nan"))
    if head_major:
        kc, vc = to_head_major(kc), to_head_major(vc)
    slots = torch.randperm(pages * page_size, generator=g)[:n].long()
    slots[n // 2] = -1  # padding
    k = torch.randn(n, hk, d, generator=g).to(src)
    v = torch.randn(n, hk, d, generator=g).to(src)
    want_k = torch.full((pages, page_size, hk, d), float("nan"), dtype=cache)
    want_v = want_k.clone()
    keep = slots >= 0
    want_k.view(-1, hk, d)[slots[keep]] = k[keep].to(cache)
    want_v.view(-1, hk, d)[slots[keep]] = v[keep].to(cache)
    torch.ops.multiverse_C.append_kv_slots(k, v, kc, vc, slots)
    assert torch.equal(kc.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), want_v.nan_to_num(7.0))


def test_append_kv_slots_refuses_bad_input() -> None:
    op = torch.ops.multiverse_C.append_kv_slots
    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    k = torch.zeros(3, 1, 8)
    with pytest.raises(RuntimeError, match="slot_mapping: slot 8 of row 2 is past"):
        op(k, k, kc, vc, torch.tensor([0, 1, 8]))
    with pytest.raises(RuntimeError, match="slot_mapping: expected a 1-D int64"):
        op(k, k, kc, vc, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="slot_mapping: expected one entry per row of k"):
        op(k, k, kc, vc, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="k: expected heads and head_dim of k_cache"):
        op(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), kc, vc, torch.tensor([0, 1, 2]))
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is not None:
        with pytest.raises(RuntimeError, match="k_cache: expected float32, float16 or bfloat16"):
            op(k, k, kc.to(f8), vc.to(f8), torch.tensor([0, 1, 2]))
