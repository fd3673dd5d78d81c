"""vLLM block tables -> a KV forest, each step, in C++ or vectorised torch (no vLLM import: testable
anywhere).

vLLM gives every running request a block table (its KV blocks in token order). Requests that share a
prompt (parallel sampling, a common system prompt, prefix-cache hits) share its *full* blocks: the
same physical block at the same logical position. :func:`forest_from_block_table` turns the step's
tables into :class:`~multiverse_kernels.ForestMetadata`: a node per maximal run of blocks that the same
set of requests shares (read once per step for all of them), and one own node per request (its private
blocks, holding its query tokens). Two implementations, identical results (tested): csrc/
block_tables.cpp (CPU tables, the default there: one O(requests x blocks) pass, ~10-35 us a decode step
with the Python around it) and O(requests x blocks) elementwise torch ops plus a sort of the shared
segments (any device: the spec, and what GPU tables use; ~0.2-1 ms on CPU); nothing per token, no
Python loop over requests or blocks.

How: only a request's full blocks before its first query token may be shared. ``count[b]`` = how many
requests list block ``b`` there; along a request's table a new node starts where the count changes (with
prefix-cached blocks the readers of a block are a subset of the readers of the block before it, so a
run of equal count is a run read by the same requests). A node is named by its first block; then the
result is *checked* (every reader of a node has the node's blocks at the node's positions, and has a
run of the same length) so that any table — even one that breaks the prefix property — gives exact
attention: when the check fails the step falls back to no sharing (each request one node).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._native import host_op
from ..metadata import ForestMetadata, MetadataError
from ..planning import PlanCapacity, TreePlan, default_num_workers, default_rows_per_tile, plan_tree_attention

__all__ = ["forest_from_block_table", "SharingStats", "FixedStepBuffers",
           "fixed_plan_capacity", "GRAPH_DEPTH"]


@dataclass(frozen=True)
class SharingStats:
    """What one step's conversion found: blocks listed by all requests' tables (up to their length), the
    unique blocks among them, shared nodes and whether the sharing check failed (then nothing is shared)."""

    listed_blocks: int
    unique_blocks: int
    shared_nodes: int
    fallback: bool = False


def _unshared(tab: Tensor, nblk: Tensor, seq: Tensor, qo: Tensor, page_size: int,
              valid: Tensor) -> ForestMetadata:
    R = seq.numel()
    dev = tab.device
    i32 = dict(dtype=torch.int32, device=dev)
    indptr = torch.zeros(R + 1, dtype=torch.int64, device=dev)
    indptr[1:] = torch.cumsum(nblk, 0)
    ar = torch.arange(R, device=dev)
    return ForestMetadata(
        node_page_indptr=indptr.to(torch.int32),
        node_page_indices=tab[valid].to(torch.int32),
        node_len=seq.to(torch.int32),
        qo_indptr=qo.to(torch.int32),
        vis_indptr=torch.arange(R + 1, **i32),
        vis_nodes=ar.to(torch.int32),
        page_size=page_size,
        node_pos=torch.zeros(R, **i32),
    )


def forest_from_block_table(block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
                            block_size: int, *, share: bool = True, stats: bool = False,
                            impl: str | None = None) -> ForestMetadata | tuple[ForestMetadata, SharingStats]:
    """The step's forest from vLLM's per-request tables.

    Args:
        block_table: int [R', M'] (R' >= R rows; only the first R, and per row the first
            ``ceil(seq_lens[r] / block_size)`` entries, are read).
        seq_lens: int [R] tokens of each request after this step's tokens are written.
        query_start_loc: int [R + 1] the step's query rows of each request (its last tokens).
        block_size: tokens per block (the cache's page size).
        share: False builds one node per request (what a per-request kernel reads).
        stats: also return :class:`SharingStats`.
        impl: ``"cpp"`` (csrc/block_tables.cpp through ``torch.ops.multiverse_C``: ~10 us for a decode
            step's tables), ``"torch"`` (the vectorised code below, the spec: ~0.2-1 ms on CPU) or None:
            C++ for CPU tensors when the extension is built, else torch. Identical results (tested).
    Returns metadata with one group per request in batch order (group ``r``'s rows are
    ``query_start_loc[r]:query_start_loc[r+1]``); every index tensor on ``block_table``'s device.
    """
    if impl not in (None, "cpp", "torch"):
        raise ValueError(f"impl: expected 'cpp', 'torch' or None, got {impl!r}")
    on_cpu = block_table.is_cpu and seq_lens.is_cpu and query_start_loc.is_cpu
    cpp = host_op("forest_from_block_table") if impl == "cpp" or (impl is None and on_cpu) else None
    if impl == "cpp" and cpp is None:
        raise ValueError("impl: 'cpp' needs the C++ extension multiverse_kernels._C (docs/build.md)")
    if cpp is not None:
        ts, (listed, unique, nodes, fallback) = cpp(block_table, seq_lens, query_start_loc, block_size, share)
        dev = block_table.device
        if dev.type != "cpu":
            ts = [t.to(dev) for t in ts]
        meta = ForestMetadata(node_page_indptr=ts[0], node_page_indices=ts[1], node_len=ts[2],
                              qo_indptr=ts[3], vis_indptr=ts[4], vis_nodes=ts[5], page_size=block_size,
                              node_pos=ts[6])
        return (meta, SharingStats(listed, unique, nodes, bool(fallback))) if stats else meta
    return _forest_torch(block_table, seq_lens, query_start_loc, block_size, share, stats)


def _forest_torch(block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor, block_size: int,
                  share: bool, stats: bool) -> ForestMetadata | tuple[ForestMetadata, SharingStats]:
    """:func:`forest_from_block_table` in vectorised torch ops (any device)."""
    dev = block_table.device
    seq = seq_lens.to(dev, torch.int64)
    R = seq.numel()
    qo = query_start_loc[: R + 1].to(dev, torch.int64)
    qlen = qo[1:] - qo[:-1]
    nblk = (seq + block_size - 1) // block_size
    M = int(nblk.max()) if R else 0
    tab = block_table[:R, :M].to(torch.int64)
    col = torch.arange(M, device=dev)
    valid = col[None, :] < nblk[:, None]
    listed = int(nblk.sum())

    def done(meta: ForestMetadata, unique: int, nodes: int, fallback: bool = False):
        return (meta, SharingStats(listed, unique, nodes, fallback)) if stats else meta

    # Only full blocks before the first query token can be shared (their K/V is final).
    nshare = torch.clamp((seq - qlen) // block_size, min=0)
    if not share or R < 2:
        return done(_unshared(tab, nblk, seq, qo, block_size, valid), listed, 0)
    shareable = col[None, :] < nshare[:, None]
    cand = tab[shareable]
    if cand.numel() < 2:
        return done(_unshared(tab, nblk, seq, qo, block_size, valid), listed, 0)
    count = torch.bincount(cand)
    cnt = torch.where(shareable, count[tab.clamp(min=0) * shareable], 0)
    lead = (cnt >= 2).long().cumprod(1).sum(1)  # shared leading blocks of each request
    if int(lead.max()) == 0:
        return done(_unshared(tab, nblk, seq, qo, block_size, valid), listed, 0)
    in_shared = col[None, :] < lead[:, None]
    prev = torch.cat([torch.full((R, 1), -1, dtype=cnt.dtype, device=dev), cnt[:, :-1]], 1)
    starts = in_shared & (cnt != prev)
    # Segments (runs of one node in one request), in row-major order.
    seg_r, seg_j0 = starts.nonzero(as_tuple=True)
    S = seg_r.numel()
    seg_id = torch.cumsum(starts.reshape(-1).long(), 0).reshape(R, M) - 1  # segment of each position
    seg_end = torch.zeros(S, dtype=torch.int64, device=dev)
    seg_end.scatter_reduce_(0, seg_id[in_shared], col.expand(R, M)[in_shared] + 1, "amax")
    seg_len = seg_end - seg_j0
    keys = tab[seg_r, seg_j0]
    uniq, inv = torch.unique(keys, return_inverse=True)
    first = torch.full((uniq.numel(),), S, dtype=torch.int64, device=dev)
    first.scatter_reduce_(0, inv, torch.arange(S, device=dev), "amin")
    rep_seg = first[inv]  # the representative (first) segment of each segment's node
    is_rep = rep_seg == torch.arange(S, device=dev)
    node_rank = torch.cumsum(is_rep.long(), 0) - 1  # node ids in order of first appearance
    seg_node = node_rank[rep_seg]
    Ns = int(is_rep.sum())
    # The check: same start, same length and the same blocks as the node's representative.
    ok = bool(((seg_j0 == seg_j0[rep_seg]) & (seg_len == seg_len[rep_seg])).all())
    if ok:
        pos_seg = seg_id[in_shared]
        pos_j = col.expand(R, M)[in_shared]
        rs = rep_seg[pos_seg]
        ok = bool((tab[in_shared] == tab[seg_r[rs], pos_j]).all())
    if not ok:
        return done(_unshared(tab, nblk, seq, qo, block_size, valid), listed, 0, fallback=True)

    # Pages: shared nodes (the representatives' runs, row-major = node order), then own nodes.
    rep_pos = in_shared & is_rep[seg_id.clamp(min=0)]
    own_mask = valid & ~in_shared
    shared_pages = tab[rep_pos]
    own_pages = tab[own_mask]
    n_own_blk = nblk - lead
    node_blocks = torch.cat([seg_len[is_rep], n_own_blk])
    indptr = torch.zeros(Ns + R + 1, dtype=torch.int64, device=dev)
    indptr[1:] = torch.cumsum(node_blocks, 0)
    node_len = torch.cat([seg_len[is_rep] * block_size, seq - lead * block_size])
    node_pos = torch.cat([seg_j0[is_rep] * block_size, lead * block_size])
    # Visibility: each request's segments' nodes in order, then its own node.
    nseg = torch.bincount(seg_r, minlength=R)
    vis_indptr = torch.zeros(R + 1, dtype=torch.int64, device=dev)
    vis_indptr[1:] = torch.cumsum(nseg + 1, 0)
    vis = torch.empty(int(vis_indptr[-1]), dtype=torch.int64, device=dev)
    seg_first = vis_indptr[:-1] - torch.arange(R, device=dev)  # = cumsum of nseg before r
    local = torch.arange(S, device=dev) - seg_first[seg_r]
    vis[vis_indptr[:-1][seg_r] + local] = seg_node
    vis[vis_indptr[1:] - 1] = Ns + torch.arange(R, device=dev)
    i32 = torch.int32
    meta = ForestMetadata(
        node_page_indptr=indptr.to(i32),
        node_page_indices=torch.cat([shared_pages, own_pages]).to(i32),
        node_len=node_len.to(i32),
        qo_indptr=qo.to(i32),
        vis_indptr=vis_indptr.to(i32),
        vis_nodes=vis.to(i32),
        page_size=block_size,
        node_pos=node_pos.to(i32),
    )
    return done(meta, int(torch.unique(tab[valid]).numel()), Ns)


# ----------------------------------------------------------------- fixed buffers (CUDA graphs)

GRAPH_DEPTH = 4
"""Nodes a query row sees on average (its shared prefixes + its own node) in a step run from fixed
buffers: the plan capacity holds ``GRAPH_DEPTH x rows`` readers. A step with more readers runs unshared
(exact; each request reads its own blocks)."""


def fixed_plan_capacity(total_q: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, num_workers: int,
                        depth: int = GRAPH_DEPTH) -> PlanCapacity:
    """A :class:`PlanCapacity` that bounds the default plan (:func:`plan_tree_attention`, automatic chunks
    for ``num_workers``) of every forest with ``total_q`` query rows and at most ``depth x total_q``
    readers (row, node seen), whatever the node lengths.

    Why it bounds (``r_n`` readers of node ``n``, ``rpt`` readers per item, ``tiles_n = ceil(r_n / rpt)``,
    ``span_n`` its tokens, ``chunk_n >= base >= work / num_workers`` where ``work = Hk * sum_n tiles_n *
    span_n`` (planning.auto_chunk_tokens), or ``chunk_n >= span_n``):

    * readers ``R = sum_n r_n <= depth * total_q``;
    * items ``sum_n tiles_n * ceil(span_n / chunk_n) <= sum_n tiles_n * span_n / base + sum_n tiles_n
      <= ceil(num_workers / Hk) + R / rpt + (nodes with readers)``, and nodes with readers ``<= R``;
    * partial slots ``sum_n r_n * ceil(span_n / chunk_n) <= num_workers * rpt / Hk + R`` (the same
      argument with ``tiles_n >= r_n / rpt``);
    * merged rows ``<= total_q``.
    """
    rpt = default_rows_per_tile(num_qo_heads, num_kv_heads, head_dim)
    readers = depth * total_q
    spread = -(-num_workers // num_kv_heads)
    items = spread + -(-readers // rpt) + readers + 1
    partials = -(-num_workers * rpt // num_kv_heads) + readers
    return PlanCapacity(readers=readers, items=items, partials=partials, merge_rows=max(total_q, 1))


PlanKey = tuple[int, int, int, int]
"""(num_qo_heads, num_kv_heads, head_dim, window or 0): one plan per distinct layer configuration."""

_FOREST_FIELDS = ("node_page_indptr", "node_page_indices", "node_len", "qo_indptr", "vis_indptr",
                  "vis_nodes", "node_pos")


class FixedStepBuffers:
    """The step's forest and plans in buffers that never move: what a captured CUDA graph reads.

    A CUDA graph replays the kernels it captured with the same pointers and the same grid, so every step
    that may run as a replay must hand the kernels its forest and plans at the same addresses, padded to
    sizes fixed by the graph's token count: the attention kernels read the forest's page lists
    (``node_page_indptr``, ``node_page_indices``) and the plan; the grid is the plan's padded item
    count (padding items have no readers). :meth:`fill` copies a step's forest into the forest buffers
    and plans it, for every layer configuration, into the plan buffers, padded to
    :func:`fixed_plan_capacity` of the step's token count (a prefix of each buffer: the same address for
    every token count). Rows past the forest's last query row (a graph's padding tokens) go to one extra
    group whose own node is empty: they see nothing (out 0, lse -inf). A step that does not fit (more
    than ``depth x rows`` readers) runs on the unshared forest, which always fits.

    Args:
        max_tokens: the largest token count a step filled here may have (the largest graph).
        max_pages: the largest number of block-table entries the step's requests list.
        device: where the buffers live.
        num_workers: the planner's ``num_workers`` (default: the device's).
        depth: :data:`GRAPH_DEPTH`.
    """

    def __init__(self, max_tokens: int, max_pages: int, device: torch.device | str, *,
                 num_workers: int | None = None, depth: int = GRAPH_DEPTH) -> None:
        self.max_tokens = int(max_tokens)
        self.depth = int(depth)
        self.device = torch.device(device)
        self.num_workers = num_workers or default_num_workers(self.device)
        nodes = 2 * self.max_tokens + 2  # shared (< requests) + own (requests <= tokens) + the padding group
        vis = self.depth * (self.max_tokens + 1)
        sizes = dict(node_page_indptr=nodes + 1, node_page_indices=max(int(max_pages), 1), node_len=nodes,
                     qo_indptr=self.max_tokens + 2, vis_indptr=self.max_tokens + 2, vis_nodes=vis,
                     node_pos=nodes)
        self._forest = {f: torch.zeros(n, dtype=torch.int32, device=self.device) for f, n in sizes.items()}
        self._plans: dict[PlanKey, dict[str, Tensor]] = {}
        self.fallbacks = 0
        """Steps that did not fit shared and ran on the unshared forest."""

    def fill(self, forest: ForestMetadata, total_q: int, keys: list[PlanKey],
             unshared: Callable[[], ForestMetadata]) -> tuple[ForestMetadata, dict[PlanKey, TreePlan]]:
        """Copy ``forest`` (``total_q`` rows, the step's padded token count, >= its query rows) into the
        buffers and plan it for every key; ``unshared()`` gives the step's unshared forest (used when the
        shared one does not fit). Returns the forest and plans as views of the buffers."""
        if total_q > self.max_tokens:
            raise MetadataError(f"total_q: expected at most {self.max_tokens} rows (the buffers' size), got "
                                f"{total_q}")
        try:
            return self._fill(forest, total_q, keys)
        except MetadataError:
            self.fallbacks += 1
            return self._fill(unshared(), total_q, keys)

    def _fill(self, forest: ForestMetadata, total_q: int,
              keys: list[PlanKey]) -> tuple[ForestMetadata, dict[PlanKey, TreePlan]]:
        forest = _pad_rows(forest, total_q)
        src = {f: getattr(forest, f) for f in _FOREST_FIELDS}
        if src["node_pos"] is None:
            src["node_pos"] = forest.positions()
        views = {}
        for f, t in src.items():
            buf = self._forest[f]
            if t.numel() > buf.numel():
                raise MetadataError(f"{f}: the step needs {t.numel()} entries, the fixed buffer holds "
                                    f"{buf.numel()}")
            views[f] = buf[: t.numel()]
            views[f].copy_(t.to(torch.int32))
        meta = ForestMetadata(page_size=forest.page_size, own_full=forest.own_full, **views)
        plans = {}
        for key in keys:
            hq, hk, d, window = key
            cap = fixed_plan_capacity(total_q, hq, hk, d, self.num_workers, self.depth)
            plan = plan_tree_attention(meta, hq, hk, head_dim=d, capacity=cap, window=window or None,
                                       num_workers=self.num_workers)
            bufs = self._plans.get(key)
            if bufs is None:  # sized for the largest step, allocated once
                big = fixed_plan_capacity(self.max_tokens, hq, hk, d, self.num_workers, self.depth)
                sizes = {f: n for f, (n, _, _) in big.sizes(self.max_tokens).items()}
                sizes["row_partial_indptr"] = self.max_tokens + 1
                bufs = self._plans[key] = {f: torch.zeros(n, dtype=torch.int32, device=self.device)
                                           for f, n in sizes.items()}
            ts = []
            for f, t in zip(TreePlan.TENSOR_FIELDS, plan.tensors(), strict=True):
                v = bufs[f][: t.numel()]
                v.copy_(t)
                ts.append(v)
            plans[key] = TreePlan.from_lists(ts, plan.ints())
        return meta, plans


def _pad_rows(forest: ForestMetadata, total_q: int) -> ForestMetadata:
    """``forest`` with rows up to ``total_q``: the rows past its last query row become one more group
    whose own node is empty (they see nothing)."""
    have = forest.total_q
    if have == total_q:
        return forest
    if have > total_q:
        raise MetadataError(f"total_q: expected at least the forest's {have} query rows, got {total_q}")
    i32 = dict(dtype=torch.int32, device=forest.device)
    n = forest.num_nodes
    last_page = forest.node_page_indptr[-1:]
    pos = forest.positions()
    return ForestMetadata(
        node_page_indptr=torch.cat([forest.node_page_indptr, last_page]),
        node_page_indices=forest.node_page_indices,
        node_len=torch.cat([forest.node_len, torch.zeros(1, **i32)]),
        qo_indptr=torch.cat([forest.qo_indptr, torch.full((1,), total_q, **i32)]),
        vis_indptr=torch.cat([forest.vis_indptr, forest.vis_indptr[-1:] + 1]),
        vis_nodes=torch.cat([forest.vis_nodes, torch.full((1,), n, **i32)]),
        page_size=forest.page_size,
        own_full=None if forest.own_full is None else torch.cat(
            [forest.own_full, torch.zeros(1, dtype=forest.own_full.dtype, device=forest.device)]),
        node_pos=torch.cat([pos, torch.zeros(1, **i32)]),
    )
