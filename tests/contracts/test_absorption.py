"""Tiny-node absorption (multiverse_kernels/absorption.py, docs/plan.md "Tiny nodes").

* The rewritten metadata is valid and every query row sees exactly the same cache slots, each once
  (a multiset compare, independent of any attention code), on random forests and the token trees;
  the reference's attention over it equals the original's (float64).
* The C++ and torch implementations agree field by field.
* On the token trees it does what it is for: fewer partial states, and fewer K+V + partial bytes in
  all (plan-derived); where it would move more bytes it leaves the metadata alone.
* The fast backends' default path (which absorbs) against the reference on token trees.
"""

from __future__ import annotations

import os

import pytest
import torch
from _strategies import forests
from _triton_interp import TRITON, needs_triton, triton_interpreter  # noqa: F401  (module fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multiverse_kernels as mk
from multiverse_kernels.absorption import MAX_ABSORBED_TOKENS, _cpp_absorber, absorb_tiny_nodes
from multiverse_kernels.forest import KVForest
from multiverse_kernels.metadata import ForestMetadata, MetadataError
from multiverse_kernels.plan_cache import cached_run_plan, run_plan
from multiverse_kernels.planning import (
    plan_kv_tokens,
    plan_loaded_tokens,
    plan_tree_attention,
)
from multiverse_kernels.testing import (
    backend_params,
    beam_forest,
    check_tree_attention,
    eagle_tree_forest,
    random_forest,
    sampling_forest,
)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
IMPLS = ["torch", "cpp"]


def need_impl(impl: str) -> None:
    """Skip a "cpp" case with a visible reason when the extension is not built (FAIL with
    MULTIVERSE_REQUIRE_CPP=1, as in CI)."""
    if impl == "cpp" and _cpp_absorber() is None:
        why = "C++ extension multiverse_kernels._C not built (torch.ops.multiverse_C.absorb_tiny_nodes)"
        if os.environ.get("MULTIVERSE_REQUIRE_CPP") == "1":
            pytest.fail(why)
        pytest.skip(why)
# (num_qo_heads, num_kv_heads, head_dim, kv_elem_size): the byte rule absorbs more at larger GQA groups
HEADS = st.sampled_from([(4, 2, 16, 4), (8, 2, 16, 2), (2, 2, 8, 4), (32, 8, 128, 2)])


def row_slots(meta: ForestMetadata) -> list[list[int]]:
    """Per query row, the sorted cache slots (page * page_size + offset) it sees, with repeats."""
    out = []
    qo, vi, vn = meta.qo_indptr.tolist(), meta.vis_indptr.tolist(), meta.vis_nodes.tolist()
    full = meta.own_full.tolist() if meta.own_full is not None else [False] * meta.num_groups
    for g in range(meta.num_groups):
        q_len = qo[g + 1] - qo[g]
        nodes = vn[vi[g]:vi[g + 1]]
        for i in range(q_len):
            slots = []
            for j, n in enumerate(nodes):
                s = meta.node_token_slots(n).tolist()
                if j == len(nodes) - 1 and not full[g]:
                    s = s[:len(s) - q_len + i + 1]
                slots += s
            out.append(sorted(slots))
    return out


def token_tree(depth: int, arity: int = 2, prompt: int = 20, page_size: int = 1,
               node_len: int = 1) -> ForestMetadata:
    """A prompt under a full ``arity``-ary tree of ``node_len``-token nodes; the leaves decode."""
    f = KVForest(8192, page_size)
    level = [f.new_sequence(prompt)]
    for _ in range(depth):
        nxt = []
        for p in level:
            for k in f.fork(p, arity):
                f.append(k, node_len)
                nxt.append(k)
        level = nxt
    return f.decode_metadata(level)


def eagle() -> ForestMetadata:
    f, groups = eagle_tree_forest(48, 1)
    return f.metadata(groups)


def moved_bytes(meta: ForestMetadata, hq: int, hk: int, d: int, elem: int) -> int:
    """K+V bytes loaded (per item, its chunk up to its readers' largest limit) + partial traffic
    (written once, read once), all KV heads, derived from the plan."""
    plan = plan_tree_attention(meta, hq, hk, head_dim=d, rows_per_tile=1024, num_workers=2)
    tokens = plan_loaded_tokens(plan)
    return tokens * 2 * hk * d * elem + 2 * plan.workspace_bytes(hq, d)


def check_equivalent(meta: ForestMetadata, absorbed: ForestMetadata) -> None:
    absorbed.validate()
    assert absorbed.num_nodes >= meta.num_nodes
    assert torch.equal(absorbed.node_len[:meta.num_nodes], meta.node_len)
    assert torch.equal(absorbed.qo_indptr, meta.qo_indptr)
    assert row_slots(absorbed) == row_slots(meta)


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(meta=forests(max_ops=8, max_len=6), heads=HEADS)
def test_absorbed_forest_sees_the_same_tokens(impl, meta, heads):
    need_impl(impl)
    hq, hk, d, elem = heads
    absorbed = absorb_tiny_nodes(meta, hq, hk, head_dim=d, kv_elem_size=elem, impl=impl)
    check_equivalent(meta, absorbed)


@SETTINGS
@given(meta=forests(max_ops=8, max_len=6), heads=HEADS)
def test_cpp_and_torch_absorption_agree(meta, heads):
    need_impl("cpp")
    hq, hk, d, elem = heads
    a = absorb_tiny_nodes(meta, hq, hk, head_dim=d, kv_elem_size=elem, impl="torch")
    b = absorb_tiny_nodes(meta, hq, hk, head_dim=d, kv_elem_size=elem, impl="cpp")
    assert (a is meta) == (b is meta)
    for t1, t2 in zip(a.tensors(), b.tensors(), strict=True):
        assert t1.dtype == t2.dtype == torch.int32
        assert torch.equal(t1, t2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("make", [
    lambda: eagle(),
    lambda: token_tree(4),
    lambda: token_tree(3, arity=3, page_size=4, node_len=4),
    lambda: (lambda fg: fg[0].metadata(fg[1]))(random_forest(3, page_size=1, max_len=3, max_nodes=24)),
], ids=["eagle", "binary", "ternary-ps4", "random-ps1"])
def test_reference_attention_unchanged(impl, make):
    need_impl(impl)
    meta = make()
    absorbed = absorb_tiny_nodes(meta, 4, 2, head_dim=16, kv_elem_size=4, impl=impl)
    assert absorbed is not meta, "these forests have tiny nodes worth absorbing"
    check_equivalent(meta, absorbed)
    num_pages = int(meta.node_page_indices.max()) + 1
    g = torch.Generator().manual_seed(0)
    q = torch.randn(meta.total_q, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(num_pages, meta.page_size, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(num_pages, meta.page_size, 2, 16, generator=g, dtype=torch.float64)
    o0, l0 = mk.tree_attention(q, k, v, meta, return_lse=True, backend="reference")
    o1, l1 = mk.tree_attention(q, k, v, absorbed, return_lse=True, backend="reference")
    torch.testing.assert_close(o1, o0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(l1, l0, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,make", [("eagle", eagle), ("binary depth 6", lambda: token_tree(6))])
def test_token_trees_move_fewer_bytes(impl, name, make):
    need_impl(impl)
    meta = make()
    hq, hk, d, elem = 32, 8, 128, 2
    absorbed = absorb_tiny_nodes(meta, hq, hk, head_dim=d, kv_elem_size=elem, impl=impl)
    p0 = plan_tree_attention(meta, hq, hk, head_dim=d)
    p1 = plan_tree_attention(absorbed, hq, hk, head_dim=d)
    # every row now reads the prompt and one virtual node (its whole chain of draft tokens): 2 partials
    assert p1.num_partials < p0.num_partials
    assert p1.num_partials <= 2 * meta.total_q, (p0.num_partials, p1.num_partials)
    assert moved_bytes(absorbed, hq, hk, d, elem) < moved_bytes(meta, hq, hk, d, elem)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_absorption_where_it_would_move_more_bytes(impl):
    need_impl(impl)
    # Sampling: the prompt has 16 successors; re-loading it 15 more times costs more than 16 partials.
    f, groups = sampling_forest(64, 16, 8, page_size=16)
    meta = f.metadata(groups)
    assert absorb_tiny_nodes(meta, 32, 8, impl=impl) is meta
    # A 3-token node with two one-row successors: absorbed at GQA 4 with fp16 K/V (a partial state is
    # ~8 tokens' K+V), not at GQA 1 with fp32 K/V (a partial ~1 token: 3 more tokens > 2 partials).
    f = KVForest(64, 1)
    root = f.new_sequence(3)
    kids = f.fork(root, 2)
    for kd in kids:
        f.append(kd, 1)
    meta = f.decode_metadata(kids)
    assert absorb_tiny_nodes(meta, 32, 8, head_dim=64, kv_elem_size=2, impl=impl) is not meta
    assert absorb_tiny_nodes(meta, 8, 8, head_dim=64, kv_elem_size=4, impl=impl) is meta
    # Chains longer than MAX_ABSORBED_TOKENS are not absorbed.
    long = token_tree(2, arity=2, prompt=20, page_size=1, node_len=MAX_ABSORBED_TOKENS + 1)
    assert absorb_tiny_nodes(long, 32, 8, impl=impl) is long


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page_size", [MAX_ABSORBED_TOKENS + 1, 16, 32])
def test_pages_longer_than_a_chain_absorb_nothing(impl, page_size):
    """absorb_tiny_nodes returns at once when page_size > MAX_ABSORBED_TOKENS (a candidate fills whole
    pages, so its chain is too long): both implementations, run past that shortcut on random forests
    with tiny and one-token nodes and on token trees, indeed absorb nothing there."""
    need_impl(impl)
    from multiverse_kernels.absorption import _absorb_torch

    metas = [token_tree(3, arity=3, page_size=page_size, node_len=page_size)]
    for seed in range(12):
        f, groups = random_forest(seed, page_size=page_size, max_len=3 * page_size)
        metas.append(f.metadata(groups))
    for meta in metas:
        for hq, hk, d, elem in [(32, 8, 128, 2), (4, 2, 16, 4), (64, 1, 64, 1)]:
            assert absorb_tiny_nodes(meta, hq, hk, head_dim=d, kv_elem_size=elem, impl=impl) is meta
            if impl == "torch":
                assert _absorb_torch(meta, hq // hk, d, elem) is None
            else:
                out = _cpp_absorber()(meta.node_page_indptr, meta.node_page_indices, meta.node_len,
                                      meta.qo_indptr, meta.vis_indptr, meta.vis_nodes, meta.page_size,
                                      hq // hk, d, elem, MAX_ABSORBED_TOKENS)
                assert out[0].numel() == 0


def test_partial_pages_are_not_absorbed():
    # A 40-token prompt and nodes of 8 tokens at page size 16 end inside a page: their page lists
    # cannot be concatenated, so nothing is absorbed although the byte rule would pay.
    f, groups = beam_forest(40, 4, 16, 8, page_size=16)
    meta = f.metadata(groups)
    assert absorb_tiny_nodes(meta, 32, 8) is meta


def test_bad_arguments():
    meta = eagle()
    with pytest.raises(MetadataError, match="num_kv_heads"):
        absorb_tiny_nodes(meta, 32, 5)
    with pytest.raises(MetadataError, match="kv_elem_size"):
        absorb_tiny_nodes(meta, 32, 8, kv_elem_size=3)
    with pytest.raises(MetadataError, match="head_dim"):
        absorb_tiny_nodes(meta, 32, 8, head_dim=0)
    with pytest.raises(MetadataError, match="impl"):
        absorb_tiny_nodes(meta, 32, 8, impl="cuda")


def test_default_path_absorbs_and_caches():
    meta = eagle()
    run, plan = cached_run_plan(meta, 4, 2, head_dim=64, kv_elem_size=4)
    assert run is not meta and run.num_nodes > meta.num_nodes
    again = cached_run_plan(meta, 4, 2, head_dim=64, kv_elem_size=4)
    assert again[0] is run and again[1] is plan
    assert plan_kv_tokens(run) >= plan_kv_tokens(meta)
    # run_plan: the same absorbed forest and plan, built afresh (no cache entry returned)
    fresh, fresh_plan = run_plan(meta, 4, 2, head_dim=64, kv_elem_size=4)
    assert fresh is not run and fresh_plan is not plan
    got, want = [*fresh.tensors(), *fresh_plan.tensors()], [*run.tensors(), *plan.tensors()]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert fresh_plan.ints() == plan.ints()
    assert run_plan(meta, 4, 2, head_dim=64, window=8)[0] is meta  # a window absorbs nothing


@pytest.mark.parametrize("backend", backend_params(exclude=("reference",)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [eagle, lambda: token_tree(3, arity=3, page_size=4, node_len=4)],
                         ids=["eagle", "ternary-ps4"])
def test_backends_default_path_on_token_trees(backend, dtype, make):
    meta = make()
    elem = torch.tensor([], dtype=dtype).element_size()
    run, _ = cached_run_plan(meta, 8, 2, head_dim=64, kv_elem_size=elem)
    assert run is not meta, "the default path must absorb on this forest for the test to mean anything"
    num_pages = int(meta.node_page_indices.max()) + 1
    check_tree_attention(backend, meta, num_pages, 8, 2, 64, dtype)
