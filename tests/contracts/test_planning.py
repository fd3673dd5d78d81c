"""The planner (multiverse_kernels/planning.py, docs/plan.md).

A pure-torch plan executor runs every work item with the reference math and merges each row's partials
with the reference merge_states; it must equal the reference tree_attention (float64) on random forests
(empty and one-token nodes, joins, extend, own_full) and the real-use shapes. Separately, every
(row, visible token) pair must be covered by exactly one partial, and the documented invariants hold.
"""

import os

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.backends.reference.merge_states import merge_states as ref_merge
from multiverse_kernels.dense_mask import dense_mask
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.planning import PlanCapacity, TreePlan, plan_tree_attention
from multiverse_kernels.testing import (
    beam_forest,
    design_example_forest,
    eagle_tree_forest,
    make_inputs,
    multiverse_forest,
    random_forest,
    sampling_forest,
)


def execute_plan(plan: TreePlan, q, k_cache, v_cache, meta, sm_scale):
    """Run the plan item by item with plain float64 math (the spec of what a kernel must do): a reader
    whose row has exactly one partial writes out/lse directly, the others their workspace slot
    ``item_partial_start + j``; then every merge row merges its slots."""
    total_q, hq, d = q.shape
    hk = k_cache.shape[2]
    grp = hq // hk
    P = plan.partial_capacity
    po = torch.full((P, hq, d), float("nan"), dtype=torch.float64)
    pl = torch.full((P, hq), float("nan"), dtype=torch.float64)
    out = torch.full((total_q, hq, d), float("nan"), dtype=torch.float64)
    lse = torch.full((total_q, hq), float("nan"), dtype=torch.float32)
    ip = plan.row_partial_indptr.tolist()
    kf, vf = k_cache.reshape(-1, hk, d).double(), v_cache.reshape(-1, hk, d).double()
    for w in range(plan.num_items):
        n = int(plan.item_node[w])
        s0, ln = int(plan.item_kv_start[w]), int(plan.item_kv_len[w])
        r0, nr = int(plan.item_reader_start[w]), int(plan.item_num_readers[w])
        p0 = int(plan.item_partial_start[w])
        slots = meta.node_token_slots(n)[s0:s0 + ln]
        k = kf[slots].repeat_interleave(grp, 1)  # [ln, Hq, D]
        v = vf[slots].repeat_interleave(grp, 1)
        rows = plan.reader_row[r0:r0 + nr].long()
        lim = plan.reader_limit[r0:r0 + nr].long()
        lo = plan.reader_lo[r0:r0 + nr].long()
        s = torch.einsum("rhd,thd->rht", q[rows].double(), k) * sm_scale
        tok = (s0 + torch.arange(ln))[None, :]
        vis = (tok < lim[:, None]) & (tok >= lo[:, None])  # [nr, ln]
        s = s.masked_fill(~vis[:, None, :], float("-inf"))
        ls = torch.logsumexp(s, -1)  # -inf for a reader that sees nothing of the chunk
        p = torch.exp(s - torch.where(torch.isfinite(ls), ls, 0)[..., None])
        o = torch.einsum("rht,thd->rhd", p, v)
        for j in range(nr):
            r = int(rows[j])
            if ip[r + 1] - ip[r] == 1:
                out[r], lse[r] = o[j], ls[j].float()
            else:
                po[p0 + j], pl[p0 + j] = o[j], ls[j]
    for r in range(total_q):
        if ip[r + 1] - ip[r] == 1:
            continue
        idx = plan.row_partial_indices[ip[r]:ip[r + 1]].long()
        o, s_ = ref_merge(po[idx][None], pl[idx][None])
        out[r], lse[r] = o[0], s_[0]
    return out, lse


def covered(plan: TreePlan, meta) -> torch.Tensor:
    """int [total_q, T] count of partials covering each (row, key) with keys in dense_mask order."""
    lens = meta.node_len.long()
    off = torch.cumsum(lens, 0) - lens
    cnt = torch.zeros(meta.total_q, int(lens.sum()), dtype=torch.int64)
    for w in range(plan.num_items):
        n = int(plan.item_node[w])
        s0, ln = int(plan.item_kv_start[w]), int(plan.item_kv_len[w])
        r0, nr = int(plan.item_reader_start[w]), int(plan.item_num_readers[w])
        for j in range(nr):
            r, lim = int(plan.reader_row[r0 + j]), int(plan.reader_limit[r0 + j])
            lo = max(s0, int(plan.reader_lo[r0 + j]))
            hi = min(s0 + ln, lim)
            if hi > lo:
                cnt[r, off[n] + lo: off[n] + hi] += 1
    return cnt


def check_invariants(plan: TreePlan, meta) -> None:
    W, R, P = plan.num_items, plan.num_readers, plan.num_partials
    rn = plan.item_num_readers[:W].long()
    assert (rn >= 1).all() and (rn <= plan.rows_per_tile).all()
    assert (plan.item_kv_len[:W] >= 1).all() and (plan.item_kv_len[:W] <= plan.chunk_tokens).all()
    ip = plan.row_partial_indptr.long()
    cnt = ip[1:] - ip[:-1]
    rr = plan.reader_row[:R].long()
    merged = torch.zeros(W, dtype=torch.long)
    for w in range(W):  # an item's merged readers (rows with != 1 partials) come first
        r0, nr = int(plan.item_reader_start[w]), int(plan.item_num_readers[w])
        m = cnt[rr[r0:r0 + nr]] != 1
        merged[w] = int(m.sum())
        assert bool(m[:merged[w]].all()) and not bool(m[merged[w]:].any())
    ps = plan.item_partial_start[:W].long()
    assert torch.equal(ps, torch.cumsum(merged, 0) - merged), "slots are laid out item after item"
    assert int(merged.sum()) == P and plan.workspace_slots >= P
    # readers sorted by node, then merged rows first, limit descending, row; an item's readers are
    # readers of its node, and every one of them sees a token of the item's chunk (no masked work)
    node_of_reader = torch.empty(R, dtype=torch.long)
    for w in range(W):
        r0, nr = int(plan.item_reader_start[w]), int(plan.item_num_readers[w])
        node_of_reader[r0:r0 + nr] = int(plan.item_node[w])
        assert bool((plan.reader_limit[r0:r0 + nr] > plan.item_kv_start[w]).all()), "masked reader"
        end = plan.item_kv_start[w] + plan.item_kv_len[w]
        assert bool((plan.reader_lo[r0:r0 + nr] < end).all()), "reader outside its window"
    lim = plan.reader_limit[:R].long()
    lo = plan.reader_lo[:R].long()
    assert bool((lo < lim).all()) and bool((lo >= 0).all())
    direct = (cnt[rr] == 1).long()
    key = torch.stack([node_of_reader, direct, -lim, -lo, rr], 1)
    for i in range(1, R):
        assert key[i - 1].tolist() < key[i].tolist(), (i, key[i - 1], key[i])
    assert (lim >= 1).all()
    assert ip[0] == 0
    entries = plan.row_partial_indices[:int(ip[-1])].long()
    assert torch.equal(entries[entries >= 0].sort().values, torch.arange(P)), "every slot once"
    assert int((entries < 0).sum()) == int((cnt == 1).sum()), "-1 exactly for rows with one partial"
    assert bool((entries[torch.repeat_interleave(cnt == 1, cnt)] < 0).all())
    single = (ip[1:] - ip[:-1]) == 1
    assert torch.equal(plan.merge_rows[:plan.num_merge_rows].long(), (~single).nonzero().flatten())
    if plan.max_item_readers and plan.item_node.numel() == W:  # unpadded
        assert plan.max_item_readers == int(rn.max())
    assert plan.max_item_readers >= (int(rn.max()) if W else 0)


def _forest_cases():
    cases = []
    for seed in range(16):
        cases.append(("random", seed))
    cases += [("multiverse", 0), ("sampling", 0), ("beam", 0), ("eagle", 0)]
    return cases


def _make(kind, seed):
    if kind == "random":
        return random_forest(seed, page_size=[1, 4, 16][seed % 3], max_len=40)
    return {"multiverse": multiverse_forest, "sampling": sampling_forest, "beam": beam_forest,
            "eagle": eagle_tree_forest}[kind]()


@pytest.mark.parametrize("kind,seed", _forest_cases())
def test_plan_matches_reference(kind, seed):
    f, groups = _make(kind, seed)
    meta = f.metadata(groups)
    if kind == "random" and seed % 4 == 3:
        meta = meta.with_own_full(torch.rand(meta.num_groups, generator=torch.Generator().manual_seed(
            seed)) < 0.5)
    hq, hk = [(4, 4), (4, 2), (8, 1), (8, 2)][seed % 4]
    chunk = [3, 8, 16, 512][seed % 4]
    rpt = [1, 2, 3, 64][(seed // 4) % 4]
    plan = plan_tree_attention(meta, hq, hk, chunk_tokens=chunk, rows_per_tile=rpt)
    check_invariants(plan, meta)
    cnt = covered(plan, meta)
    assert torch.equal(cnt, dense_mask(meta).long()), "every (row, visible token) exactly once"
    q, k, v = make_inputs(meta, f.num_pages, hq, hk, 16, torch.float64, seed=seed)
    out, lse = execute_plan(plan, q, k, v, meta, 0.3)
    ref_out, ref_lse = mk.tree_attention(q, k, v, meta, sm_scale=0.3, return_lse=True,
                                         backend="reference")
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6)


def test_worked_example():
    """docs/design.md §2's example, planned with chunk 4 and 2 readers per tile, checked field by field."""
    f, groups = design_example_forest()
    meta = f.metadata(groups)
    p = plan_tree_attention(meta, 2, 1, chunk_tokens=8, rows_per_tile=3)
    # readers by node: trunk rows 0,1,2,3; A rows 0,2,3; B rows 1,2,3; C rows 3,2 (causal 2, 1:
    # limit descending, so that the readers of a later chunk are a prefix)
    assert p.reader_row.tolist() == [0, 1, 2, 3, 0, 2, 3, 1, 2, 3, 3, 2]
    assert p.reader_limit.tolist() == [10, 10, 10, 10, 5, 5, 5, 3, 3, 3, 2, 1]
    # trunk: 2 chunks (8 + 2 tokens) x 2 tiles (3 + 1 readers), chunk-major
    assert p.item_node.tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert p.item_kv_start.tolist() == [0, 0, 8, 8, 0, 0, 0]
    assert p.item_kv_len.tolist() == [8, 8, 2, 2, 5, 3, 2]
    assert p.item_reader_start.tolist() == [0, 3, 0, 3, 4, 7, 10]
    assert p.item_num_readers.tolist() == [3, 1, 3, 1, 3, 3, 2]
    assert p.item_partial_start.tolist() == [0, 3, 4, 7, 8, 11, 14]
    assert p.row_partial_indptr.tolist() == [0, 3, 6, 11, 16]
    assert p.row_partial_indices.tolist() == [0, 4, 8, 1, 5, 11, 2, 6, 9, 12, 15, 3, 7, 10, 13, 14]
    assert p.merge_rows.tolist() == [0, 1, 2, 3]
    assert (p.num_items, p.num_partials, p.num_readers, p.workspace_slots) == (7, 16, 12, 16)


def test_causal_extend_skips_masked_chunks_and_writes_rows_directly():
    """A causal 40-token extend of one node, chunk 8, 4 readers per tile: chunk c is seen by the
    40 - 8c rows past it only, so 10 + 8 + 6 + 4 + 2 = 30 items (not 5 x 10 = 50); the first 8 rows
    see one chunk and are written straight to out (no workspace slot)."""
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    meta = mk.ForestMetadata(i32([0, 3]), i32([0, 1, 2]), i32([40]), i32([0, 40]), i32([0, 1]),
                             i32([0]), 16)
    p = plan_tree_attention(meta, 2, 1, chunk_tokens=8, rows_per_tile=4)
    check_invariants(p, meta)
    assert torch.equal(covered(p, meta), dense_mask(meta).long())
    assert p.num_items == 30
    assert p.num_partials == sum(40 - 8 * c for c in range(5)) - 8 == 112
    assert p.merge_rows.tolist() == list(range(8, 40))
    # automatic split: the row tiles fill the workers, so the node is not split at all
    auto = plan_tree_attention(meta, 2, 1, rows_per_tile=4, num_workers=8)
    assert auto.chunk_tokens == 40 and auto.num_items == 10 and auto.workspace_slots == 0


def _causal_prefill_meta(tokens: int) -> mk.ForestMetadata:
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    pages = -(-tokens // 16)
    return mk.ForestMetadata(i32([0, pages]), torch.arange(pages, dtype=torch.int32), i32([tokens]),
                             i32([0, tokens]), i32([0, 1]), i32([0]), 16)


def _no_masked_items(p) -> bool:
    """Every reader of every item sees a token of the item's chunk (vectorized over the plan)."""
    W = p.num_items
    nr = p.item_num_readers[:W].long()
    item = torch.repeat_interleave(torch.arange(W), nr)
    j = torch.arange(int(nr.sum())) - (torch.cumsum(nr, 0) - nr)[item]
    rd = p.item_reader_start[:W].long()[item] + j
    return bool((p.reader_limit.long()[rd] > p.item_kv_start.long()[item]).all())


@pytest.mark.parametrize("tokens", [4096, 32768])
@pytest.mark.parametrize("workers", [4, 264, 1024])
def test_prefill_workspace_at_most_twice_the_output(tokens, workers):
    """Causal prefill, 32 query / 8 KV heads, head_dim 128, fp16 output: the plan's partial workspace
    (computed from the plan, no kernel run) is at most 2x the output's bytes, and no item holds a
    (row, chunk) pair the row cannot see."""
    meta = _causal_prefill_meta(tokens)
    p = plan_tree_attention(meta, 32, 8, head_dim=128, num_workers=workers)
    out_bytes = tokens * 32 * 128 * 2
    assert p.workspace_bytes(32, 128) <= 2 * out_bytes, (p.workspace_bytes(32, 128), out_bytes)
    assert _no_masked_items(p)
    assert int(p.row_partial_indptr[-1]) >= tokens  # every row has a partial


def test_capacity_padding_and_copy_into():
    f, groups = random_forest(3, page_size=4)
    meta = f.metadata(groups)
    p = plan_tree_attention(meta, 4, 2, chunk_tokens=8, rows_per_tile=2)
    cap = PlanCapacity(readers=p.num_readers + 5, items=p.num_items + 7, partials=p.num_partials + 3,
                       merge_rows=p.num_merge_rows + 2)
    pp = plan_tree_attention(meta, 4, 2, chunk_tokens=8, rows_per_tile=2, capacity=cap)
    assert pp.item_node.numel() == cap.items and pp.partial_capacity == cap.partials
    assert pp.max_item_readers == pp.rows_per_tile == 2, "row tile sized for any plan in the buffers"
    check_invariants(pp, meta)
    assert (pp.item_num_readers[p.num_items:] == 0).all(), "padding items have no readers"
    assert (pp.merge_rows[p.num_merge_rows:] == -1).all()
    for name in TreePlan.TENSOR_FIELDS:
        a, b = getattr(p, name), getattr(pp, name)  # the padded arrays start with the plan
        assert torch.equal(b[:a.numel()], a), name
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 16, torch.float64)
    torch.testing.assert_close(execute_plan(pp, q, k, v, meta, 0.25)[0],
                               execute_plan(p, q, k, v, meta, 0.25)[0])
    # copy a new step's plan into fixed buffers
    f2, g2 = random_forest(4, page_size=4)
    p2 = plan_tree_attention(f2.metadata(g2), 4, 2, chunk_tokens=8, rows_per_tile=2,
                             capacity=PlanCapacity(400, 400, 400, 400))
    buf = plan_tree_attention(meta, 4, 2, chunk_tokens=8, rows_per_tile=2,
                              capacity=PlanCapacity(400, 400, 400, 400))
    if p2.row_partial_indptr.shape == buf.row_partial_indptr.shape:
        out = p2.copy_into(buf)
        assert out.item_node.data_ptr() == buf.item_node.data_ptr()
        assert torch.equal(buf.item_node, p2.item_node)
    with pytest.raises(MetadataError, match="capacity.items"):
        plan_tree_attention(meta, 4, 2, chunk_tokens=8, rows_per_tile=2,
                            capacity=PlanCapacity(1000, 1, 1000, 1000))


def test_bad_arguments():
    f, groups = sampling_forest()
    meta = f.metadata(groups)
    with pytest.raises(MetadataError, match="num_kv_heads"):
        plan_tree_attention(meta, 4, 3)
    with pytest.raises(MetadataError, match="chunk_tokens"):
        plan_tree_attention(meta, 4, 2, chunk_tokens=0)
    with pytest.raises(MetadataError, match="rows_per_tile"):
        plan_tree_attention(meta, 4, 2, rows_per_tile=0)


def test_round_trip_lists():
    f, groups = eagle_tree_forest()
    p = plan_tree_attention(f.metadata(groups), 8, 2)
    p2 = TreePlan.from_lists(p.tensors(), p.ints())
    assert p2.ints() == p.ints()
    assert all(a is b for a, b in zip(p.tensors(), p2.tensors(), strict=True))


def test_plan_scales_to_1024_leaves():
    """1,024 leaves under a 3-level tree (prompt, 32 subtrees, 1024 leaves) plans; speed is shown by
    benchmarks/plan_build.py (numbers in docs/plan.md), not asserted here: a timed test on a shared
    2-core CI machine measures the neighbours, not the planner."""
    f = mk.KVForest(8192, 16)
    leaves = []
    for mid in f.fork(f.new_sequence(512), 32):
        f.append(mid, 64)
        for leaf in f.fork(mid, 32):
            f.append(leaf, 16)
            leaves.append(leaf)
    meta = f.decode_metadata(leaves)
    plan = plan_tree_attention(meta, 32, 8)
    assert int(plan.row_partial_indptr[-1]) >= 3 * 1024
    assert plan.num_merge_rows == 1024


@pytest.mark.parametrize("seed", range(12))
def test_cpp_and_torch_planners_agree(seed):
    """The C++ host planner (the default when the extension is built) builds the torch planner's plan
    exactly, with fixed and automatic chunks."""
    from multiverse_kernels.planning import _cpp_planner

    if _cpp_planner() is None:
        if os.environ.get("MULTIVERSE_REQUIRE_CPP") == "1":
            raise AssertionError("multiverse_kernels._C is not built")
        pytest.skip("C++ extension not built (docs/build.md): only the torch planner exists")
    f, groups = random_forest(900 + seed, page_size=[1, 4, 16][seed % 3], max_len=[24, 90][seed % 2])
    meta = f.metadata(groups)
    if seed % 3 == 2:
        meta = meta.with_own_full(torch.arange(meta.num_groups) % 2 == 0)
    for kw in (dict(), dict(chunk_tokens=5, rows_per_tile=2), dict(num_workers=50, rows_per_tile=3),
               dict(num_workers=1)):
        a = plan_tree_attention(meta, 8, 2, impl="torch", **kw)
        b = plan_tree_attention(meta, 8, 2, impl="cpp", **kw)
        assert a.ints() == b.ints(), kw
        for name, x, y in zip(TreePlan.TENSOR_FIELDS, a.tensors(), b.tensors(), strict=True):
            assert torch.equal(x, y), (kw, name)


def test_empty_groups_and_empty_nodes():
    """A group with no rows and no nodes, a listed empty node, and a forest with no rows at all."""
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    meta = mk.ForestMetadata(
        node_page_indptr=i32([0, 1, 1, 2]), node_page_indices=i32([0, 1]), node_len=i32([3, 0, 2]),
        qo_indptr=i32([0, 0, 2]), vis_indptr=i32([0, 0, 3]), vis_nodes=i32([0, 1, 2]), page_size=4)
    meta.validate(2)
    p = plan_tree_attention(meta, 2, 1, chunk_tokens=2, rows_per_tile=1)
    check_invariants(p, meta)
    assert torch.equal(covered(p, meta), dense_mask(meta).long())
    assert p.item_node.tolist() == [0, 0, 0, 0, 2, 2]  # node 1 (empty) has no items
    assert p.reader_limit.tolist() == [3, 3, 2, 1]  # causal own node: limit descending
    none = mk.ForestMetadata(i32([0, 1]), i32([0]), i32([3]), i32([0, 0]), i32([0, 1]), i32([0]), 4)
    p0 = plan_tree_attention(none, 2, 1)
    assert (p0.num_items, p0.num_partials, p0.num_readers, p0.num_merge_rows) == (0, 0, 0, 0)
    assert p0.row_partial_indptr.tolist() == [0]


def test_cached_plan_keys_on_tensors():
    from multiverse_kernels.plan_cache import cached_plan

    f, groups = random_forest(11, page_size=4)
    meta = f.metadata(groups)
    p1 = cached_plan(meta, 4, 2, head_dim=64)
    rebuilt = mk.ForestMetadata(*meta.tensors(), meta.page_size, meta.own_full)  # as the op does
    assert cached_plan(rebuilt, 4, 2, head_dim=64) is p1
    assert cached_plan(meta, 8, 2, head_dim=64) is not p1  # other head counts
    with torch.no_grad():
        meta.node_len[0] += 0  # an in-place write bumps the version counter: plan again
    p2 = cached_plan(meta, 4, 2, head_dim=64)
    assert p2 is not p1 and torch.equal(p2.item_node, p1.item_node)
    meta2 = f.metadata(groups)  # equal values, new tensors
    assert cached_plan(meta2, 4, 2, head_dim=64) is not p2
    p3 = cached_plan(meta2, 4, 2, head_dim=64)
    assert cached_plan(meta2, 4, 2, head_dim=64) is p3
    meta2.node_len.numpy()[0] += 1  # changed behind the version counter: the content compare sees it
    assert cached_plan(meta2, 4, 2, head_dim=64) is not p3
    with torch.inference_mode():  # inference tensors (no version counter): keyed on identity and contents
        meta3 = f.metadata(groups)
        p4 = cached_plan(meta3, 4, 2, head_dim=64)
        assert cached_plan(meta3, 4, 2, head_dim=64) is p4
        meta3.node_len.numpy()[0] += 1
        assert cached_plan(meta3, 4, 2, head_dim=64) is not p4


# ---------------------------------------------------------------------------------- sliding window
def window_mask(meta, window):
    """bool [total_q, T]: dense_mask (keys in node order) and pos(row) - pos(key) < window, positions
    from meta.positions() (node n's token j at node_pos[n] + j; a row is its own node's token)."""
    pos = meta.positions().long()
    lens = meta.node_len.long()
    kpos = torch.cat([pos[n] + torch.arange(int(lens[n])) for n in range(meta.num_nodes)])
    rpos = []
    qo, vi, vis = meta.qo_indptr.tolist(), meta.vis_indptr.tolist(), meta.vis_nodes.tolist()
    for g in range(meta.num_groups):
        ql = qo[g + 1] - qo[g]
        if ql:
            own = vis[vi[g + 1] - 1]
            rpos.append(pos[own] + lens[own] - ql + torch.arange(ql))
    rpos = torch.cat(rpos) if rpos else torch.zeros(0, dtype=torch.long)
    return dense_mask(meta) & ((rpos[:, None] - kpos[None, :]) < window)


@pytest.mark.parametrize("seed", range(12))
def test_window_plan_covers_the_windowed_mask(seed):
    """Every (row, key) the forest AND the window allow is covered exactly once, nothing else; no item
    holds a reader that sees nothing of its chunk; the plan runs to the reference's windowed answer;
    C++ and torch planners agree."""
    from multiverse_kernels.planning import _cpp_planner
    from multiverse_kernels.variants import Variant

    f, groups = random_forest(300 + seed, page_size=[1, 4, 16][seed % 3], max_len=[24, 60][seed % 2])
    meta = f.metadata(groups)
    if seed % 4 == 3:
        meta = meta.with_own_full(torch.arange(meta.num_groups) % 2 == 0)
    if seed % 5 == 4:
        meta = meta.with_node_pos(None)  # the default positions
    window = [1, 3, 7, 20][seed % 4]
    hq, hk = [(4, 4), (4, 2), (8, 1), (8, 2)][seed % 4]
    for kw in (dict(chunk_tokens=[3, 8, 16][seed % 3], rows_per_tile=[1, 2, 64][seed % 3]),
               dict(num_workers=[1, 7, 50][seed % 3])):
        plan = plan_tree_attention(meta, hq, hk, window=window, impl="torch", **kw)
        assert plan.window == window
        check_invariants(plan, meta)
        assert torch.equal(covered(plan, meta), window_mask(meta, window).long())
        if _cpp_planner() is not None:
            b = plan_tree_attention(meta, hq, hk, window=window, impl="cpp", **kw)
            assert plan.ints() == b.ints(), kw
            for name, x, y in zip(TreePlan.TENSOR_FIELDS, plan.tensors(), b.tensors(), strict=True):
                assert torch.equal(x, y), (kw, name)
    q, k, v = make_inputs(meta, f.num_pages, hq, hk, 16, torch.float64, seed=seed)
    out, lse = execute_plan(plan, q, k, v, meta, 0.3)
    from multiverse_kernels.backends.reference import tree_attention as ref

    ref_out, ref_lse = ref(q, k, v, meta, 0.3, variant=Variant(window=window))
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6)


def test_window_skips_chunks_outside_every_window():
    """A decode row over a 4,096-token prefix with a 512-token window: only the chunks that hold its
    last 512 positions are planned; a long causal prefill loads about (W + tile) / L of its keys."""
    from multiverse_kernels.planning import plan_kv_tokens, plan_loaded_tokens

    f = mk.KVForest(4096 // 16 + 8, 16)
    root = f.new_sequence(4096)
    meta = f.metadata([(root, 1)])
    for impl in ("torch", "cpp"):
        if impl == "cpp":
            from multiverse_kernels.planning import _cpp_planner
            if _cpp_planner() is None:
                continue
        plan = plan_tree_attention(meta, 8, 2, chunk_tokens=256, window=512, impl=impl)
        assert plan.num_readers == 1 and plan.reader_lo.tolist() == [4096 - 512]
        assert plan.item_kv_start.tolist() == [3584, 3840]  # 2 of the 16 chunks
        assert plan_loaded_tokens(plan) == 512
    f = mk.KVForest(8192 // 16 + 8, 16)
    root = f.new_sequence(0)
    f.append(root, 8192)
    meta = f.metadata([(root, 8192)])
    full = plan_tree_attention(meta, 8, 2, num_workers=8)
    win = plan_tree_attention(meta, 8, 2, num_workers=8, window=1024)
    unique = plan_kv_tokens(meta)
    assert plan_loaded_tokens(win) < 0.35 * plan_loaded_tokens(full)
    ratio = plan_loaded_tokens(win) / (unique * win.num_items)
    assert ratio < 2 * (1024 + win.rows_per_tile) / 8192


def test_window_plan_cache_keys_on_the_window():
    from multiverse_kernels.plan_cache import cached_plan, cached_run_plan

    f, groups = random_forest(12, page_size=1)
    meta = f.metadata(groups)
    p0 = cached_plan(meta, 4, 2, head_dim=64)
    p3 = cached_plan(meta, 4, 2, head_dim=64, window=3)
    assert p0 is not p3 and p3.window == 3 and p0.window == 0
    assert cached_plan(meta, 4, 2, head_dim=64, window=3) is p3
    run, p = cached_run_plan(meta, 4, 2, head_dim=64, window=3)
    assert run is meta  # a window never absorbs (absorption rewrites node ids and positions)
    shifted = meta.positions().clone()
    shifted[-1] += 5
    assert cached_plan(meta.with_node_pos(shifted), 4, 2, head_dim=64, window=3) is not p3
