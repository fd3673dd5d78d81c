"""Planning: turn forest metadata into a work list for the fast kernels (docs/design.md §4, docs/plan.md).

A *reader* is one (query row, visible node) pair with a non-empty node. A *work item* is (a chunk of
one node's tokens, a contiguous run of at most ``rows_per_tile`` of the node's readers that see the
chunk); it runs for one KV head with the GQA heads of its readers packed into the row dimension, loads
the chunk's K/V once and writes one partial state ``(out, lse)`` per reader. Each query row then merges
its partials; a row with exactly one partial is written straight to the output (no workspace slot).

Two implementations build identical plans: the C++ host planner (csrc/plan.cpp, through
``torch.ops.multiverse_C.plan_tree_attention``; the default when the extension is built) and
vectorized torch (repeat_interleave / cumsum / sort, no Python loops over tokens, rows or nodes). The
field lists are defined once in :mod:`multiverse_kernels.plan_format`; the exact format is documented
in docs/plan.md; the Triton and the C++/CUDA backends all consume it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ._native import host_op
from .metadata import ForestMetadata, MetadataError
from .plan_format import INT_FIELDS, MIN_CHUNK_TOKENS, TENSOR_FIELDS
from .tiles import MAX_TILE_ROWS

__all__ = ["TreePlan", "PlanCapacity", "plan_tree_attention",
           "plan_loaded_tokens", "plan_kv_tokens", "default_rows_per_tile", "default_num_workers",
           "auto_chunk_tokens", "MIN_CHUNK_TOKENS", "MAX_TILE_ROWS", "invariant_plan",
           "INVARIANT_CHUNK_TOKENS", "check_plan_window"]

# Packed (reader x GQA head) rows per work item by head_dim: the Triton kernel's largest row tile
# (multiverse_kernels/tiles.py), so that a chunk is loaded once for all of them.

# Default chunk of :func:`invariant_plan` (the branch- and thread-count-invariant mode): every node is
# split at multiples of this many tokens, whatever the forest and the device (docs/errors.md,
# "Determinism"). The auto planner's smallest chunk, so the invariant plan never splits a node more
# coarsely than the auto plan would (at least its parallelism), at the price of more partial states
# wherever the auto plan splits less (see invariant_plan).
INVARIANT_CHUNK_TOKENS = MIN_CHUNK_TOKENS


def default_rows_per_tile(num_qo_heads: int, num_kv_heads: int, head_dim: int = 128) -> int:
    """Readers per work item such that readers x GQA group fills the kernel's row tile (>= 1)."""
    group = num_qo_heads // max(num_kv_heads, 1)
    return max(1, MAX_TILE_ROWS.get(head_dim, 64) // max(group, 1))


@dataclass(frozen=True)
class PlanCapacity:
    """Fixed sizes to pad a plan to, so buffers (and a CUDA graph over the run step) can be reused.

    readers >= R, items >= W, partials >= P (workspace slots), merge_rows >= M of every plan built with
    this capacity. ``row_partial_indices`` is padded to ``partials + total_q`` entries.
    """

    readers: int
    items: int
    partials: int
    merge_rows: int

    def sizes(self, total_q: int) -> dict[str, tuple[int, int, str]]:
        """(entries, padding value, capacity field) of each padded tensor field of a plan for ``total_q``
        rows (``row_partial_indptr``, never padded, is not listed: it has ``total_q + 1``)."""
        pad = dict(reader_row=(self.readers, 0, "readers"), reader_limit=(self.readers, 0, "readers"),
                   reader_lo=(self.readers, 0, "readers"),
                   row_partial_indices=(self.partials + total_q, -1, "partials"),
                   merge_rows=(self.merge_rows, -1, "merge_rows"))
        for f in ("item_node", "item_kv_start", "item_kv_len", "item_reader_start", "item_num_readers",
                  "item_partial_start"):
            pad[f] = (self.items, 0, "items")
        return pad


@dataclass(frozen=True)
class TreePlan:
    """The work list of one step; int32 tensors on the metadata's device. See docs/plan.md.

    Tensor fields (sizes are the padded capacities when built with a :class:`PlanCapacity`)::

        reader_row          [R]   query row of each reader (readers sorted by node, then row)
        reader_limit        [R]   leading tokens of the node the row sees
        reader_lo           [R]   first token of the node the row sees (sliding window; 0 without):
                                  the row sees tokens reader_lo .. reader_limit - 1
        item_node           [W]   node of each work item
        item_kv_start       [W]   first token of the item's chunk
        item_kv_len         [W]   tokens in the chunk
        item_reader_start   [W]   first reader of the item (index into reader_*)
        item_num_readers    [W]   readers of the item (<= rows_per_tile; 0 for a padding item)
        item_partial_start  [W]   reader j of the item whose row is merged writes workspace slot
                                  item_partial_start + j (an item's merged readers come first)
        row_partial_indptr  [total_q + 1]  partials of row r: indptr[r + 1] - indptr[r]
        row_partial_indices [E]   row_partial_indices[indptr[r]:indptr[r+1]]: workspace slots of
                                  row r's partials; -1 for the only partial of a row with one
        merge_rows          [M]   rows with != 1 partials (-1 for padding); rows with exactly one
                                  partial are written straight to out by the attention kernel
    """

    reader_row: Tensor
    reader_limit: Tensor
    reader_lo: Tensor
    item_node: Tensor
    item_kv_start: Tensor
    item_kv_len: Tensor
    item_reader_start: Tensor
    item_num_readers: Tensor
    item_partial_start: Tensor
    row_partial_indptr: Tensor
    row_partial_indices: Tensor
    merge_rows: Tensor
    # python ints (not padded)
    num_readers: int
    num_items: int
    num_partials: int
    num_merge_rows: int
    max_item_readers: int
    chunk_tokens: int
    rows_per_tile: int
    workspace_slots: int
    num_workers: int
    window: int

    TENSOR_FIELDS = TENSOR_FIELDS  # multiverse_kernels/plan_format.py
    INT_FIELDS = INT_FIELDS

    @property
    def device(self) -> torch.device:
        return self.item_node.device

    @property
    def partial_capacity(self) -> int:
        """Partial slots the workspace must hold (>= num_partials; the padded size)."""
        return self.workspace_slots

    def workspace_bytes(self, num_qo_heads: int, head_dim: int) -> int:
        """Bytes of the fp32 partial workspace (partial_out + partial_lse) a run of this plan uses."""
        return self.workspace_slots * num_qo_heads * (head_dim + 1) * 4

    def tensors(self) -> list[Tensor]:
        """The tensor fields in :attr:`TENSOR_FIELDS` order (the op schema's ``plan_tensors``)."""
        lists = self.__dict__.get("_lists")
        if lists is None:  # computed once per plan: the op is called once per layer
            lists = ([getattr(self, f) for f in self.TENSOR_FIELDS],
                     [getattr(self, f) for f in self.INT_FIELDS])
            object.__setattr__(self, "_lists", lists)
        return lists[0]

    def ints(self) -> list[int]:
        """The int fields in :attr:`INT_FIELDS` order (the op schema's ``plan_ints``)."""
        self.tensors()
        return self.__dict__["_lists"][1]

    @classmethod
    def from_lists(cls, tensors: list[Tensor], ints: list[int]) -> TreePlan:
        """Inverse of :meth:`tensors` / :meth:`ints`."""
        if len(tensors) != len(cls.TENSOR_FIELDS) or len(ints) != len(cls.INT_FIELDS):
            raise MetadataError(
                f"plan: expected {len(cls.TENSOR_FIELDS)} tensors and {len(cls.INT_FIELDS)} ints, got "
                f"{len(tensors)} and {len(ints)}"
            )
        # bypass the frozen dataclass __init__ (per-call overhead in the op): same fields, no checks
        plan = object.__new__(cls)
        plan.__dict__.update(zip(cls.TENSOR_FIELDS, tensors, strict=True))
        plan.__dict__.update(zip(cls.INT_FIELDS, ints, strict=True))
        return plan

    def copy_into(self, dst: TreePlan) -> TreePlan:
        """Copy this plan's tensors into ``dst``'s buffers (same capacities) and return a plan that
        uses those buffers: the pattern for replaying a captured CUDA graph with a new step's plan."""
        for f in self.TENSOR_FIELDS:
            a, b = getattr(self, f), getattr(dst, f)
            if a.shape != b.shape:
                raise MetadataError(f"plan.{f}: expected shape {tuple(b.shape)} like dst, got "
                                    f"{tuple(a.shape)} (build both with the same PlanCapacity)")
            b.copy_(a, non_blocking=True)
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update({f: getattr(dst, f) for f in self.TENSOR_FIELDS})
        return TreePlan(**kw)


def _exclusive_cumsum(x: Tensor) -> Tensor:
    out = torch.zeros(x.numel() + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(x, 0, out=out[1:])
    return out


def _ceil_div(a: Tensor, b: Tensor | int) -> Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def _pad(t: Tensor, size: int, value: int, name: str) -> Tensor:
    if t.numel() > size:
        raise MetadataError(f"capacity.{name}: plan needs {t.numel()}, capacity is {size}")
    if t.numel() == size:
        return t
    return torch.cat([t, t.new_full((size - t.numel(),), value)])


def default_num_workers(device: torch.device | str) -> int:
    """Work units the device runs at once: 2 x the SM count of a CUDA device (two CTAs per SM), the
    intra-op thread count (``torch.get_num_threads()``) on a CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, torch.get_num_threads())


def auto_chunk_tokens(node_len: Tensor, n_readers: Tensor, rows_per_tile: int, group: int,
                      num_kv_heads: int, num_workers: int, span: Tensor | None = None) -> Tensor:
    """Per-node chunk length (int64 [N]) chosen from the forest and the device's parallelism.

    The K/V work of the step, ``sum_n tiles_n * len_n * num_kv_heads`` tokens (``tiles_n`` reader tiles
    of node ``n``, each loading the node once), is spread over ``num_workers``: a chunk holds at most
    ``ceil(work / num_workers)`` tokens rounded up to a multiple of 64, and at least
    ``MIN_CHUNK_TOKENS``. A node is never split finer than its packed rows (``readers x group``, rounded
    up to 64): the partial states a chunk writes (4 bytes x head_dim per packed row) then stay within
    the chunk's K/V bytes. A chunk never exceeds its node. Prefill and long extends, whose row tiles
    alone fill the device, are therefore not split at all (every row one partial: no workspace).
    ``span``: tokens of each node its readers see (``node_len`` minus the smallest ``reader_lo``; the
    default ``node_len`` is the span without a sliding window), what the work counts.
    """
    has = n_readers > 0
    tiles = _ceil_div(n_readers, rows_per_tile)
    span = node_len if span is None else span
    work = int((tiles * span)[has].sum()) * num_kv_heads if node_len.numel() else 0
    budget = -(-work // max(1, num_workers))
    base = max(MIN_CHUNK_TOKENS, -(-budget // 64) * 64)
    packed = _ceil_div(n_readers * group, 64) * 64
    chunk = torch.clamp(packed, min=base)
    return torch.minimum(chunk, torch.clamp(node_len, min=1))


def _cpp_planner():
    """torch.ops.multiverse_C.plan_tree_attention when the C++ extension is built, else None."""
    return host_op("plan_tree_attention")


def check_plan_window(plan: TreePlan, window: int | None) -> None:
    """A plan's readers see ``[reader_lo, reader_limit)``: it must have been built for the call's sliding
    window (``plan.window``, 0 = none). No sync: the op checks it on every call, validate or not."""
    if plan.window != (window or 0):
        raise MetadataError(
            f"plan.window: the plan was built for window {plan.window or None}, the call asks for {window}; "
            f"build it with plan_tree_attention(..., window={window})")


def plan_tree_attention(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, *,
                        chunk_tokens: int | None = None, rows_per_tile: int | None = None,
                        head_dim: int = 128, capacity: PlanCapacity | None = None,
                        num_workers: int | None = None, impl: str | None = None,
                        window: int | None = None, node_pos: Tensor | None = None) -> TreePlan:
    """Build the work list of one step for ``meta`` (see docs/plan.md for the exact format).

    Args:
        meta: the forest metadata (index tensors int32, any device; the plan lands on that device).
        num_qo_heads, num_kv_heads: head counts (GQA ratio = num_qo_heads // num_kv_heads).
        chunk_tokens: max tokens of one node per work item (split-KV) for every node; default
            (None): chosen per node from the forest and ``num_workers`` (:func:`auto_chunk_tokens`).
        rows_per_tile: max readers per work item; default fills the kernels' packed row tile
            (:func:`default_rows_per_tile` for ``head_dim``).
        capacity: pad every array to these sizes (CUDA-graph friendly buffers); error if too small.
        num_workers: work units the device runs at once (default :func:`default_num_workers` of the
            metadata's device); only used when ``chunk_tokens`` is None.
        impl: ``"cpp"`` (the C++ host planner, csrc/plan.cpp, through ``torch.ops.multiverse_C``),
            ``"torch"`` (vectorized torch, this module) or None: C++ when the extension is built.
            Both build identical plans (tested).
        window: sliding window (multiverse_kernels/variants.py): each reader gets ``reader_lo =
            max(0, pos(row) - node_pos[n] - window + 1)``, readers that see no token of their node are
            dropped and chunks outside every reader's window are not planned (docs/plan.md, "Sliding
            window"). None: no window (every ``reader_lo`` is 0).
        node_pos: int32 [num_nodes] start positions the window measures in; default
            ``meta.positions()`` (only used with a window).
    Returns:
        a :class:`TreePlan`. The C++ planner copies the metadata to the host and the plan back; the
        torch planner syncs with the device a few times (array sizes).
    """
    if num_kv_heads < 1 or num_qo_heads % num_kv_heads:
        raise MetadataError(f"num_kv_heads: expected a divisor of num_qo_heads={num_qo_heads}, "
                            f"got {num_kv_heads}")
    if rows_per_tile is None:
        rows_per_tile = default_rows_per_tile(num_qo_heads, num_kv_heads, head_dim)
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise MetadataError(f"chunk_tokens: expected a positive int or None, got {chunk_tokens!r}")
    if not isinstance(rows_per_tile, int) or rows_per_tile < 1:
        raise MetadataError(f"rows_per_tile: expected a positive int, got {rows_per_tile!r}")
    if num_workers is None:
        num_workers = default_num_workers(meta.device)
    if not isinstance(num_workers, int) or num_workers < 1:
        raise MetadataError(f"num_workers: expected a positive int, got {num_workers!r}")
    if impl not in (None, "cpp", "torch"):
        raise MetadataError(f"impl: expected 'cpp', 'torch' or None, got {impl!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise MetadataError(f"window: expected a positive int or None, got {window!r}")
    if window is not None and node_pos is None:
        node_pos = meta.positions()
    group = num_qo_heads // num_kv_heads
    cpp = _cpp_planner() if impl != "torch" else None
    if impl == "cpp" and cpp is None:
        raise MetadataError("impl: 'cpp' needs the C++ extension multiverse_kernels._C (docs/build.md)")
    if cpp is not None:
        ts, ints = cpp(meta.node_len, meta.qo_indptr, meta.vis_indptr, meta.vis_nodes, meta.own_full,
                       chunk_tokens or 0, rows_per_tile, group, num_kv_heads, num_workers,
                       node_pos if window is not None else None, window or 0)
        plan = TreePlan.from_lists(list(ts), ints.tolist())
    else:
        plan = _plan_torch(meta, group, num_kv_heads, chunk_tokens, rows_per_tile, num_workers,
                           window, node_pos)
    return plan if capacity is None else _pad_plan(plan, capacity, meta.total_q)


def invariant_plan(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, *, head_dim: int = 128,
                   chunk_tokens: int = INVARIANT_CHUNK_TOKENS, rows_per_tile: int | None = None,
                   capacity: PlanCapacity | None = None, impl: str | None = None,
                   window: int | None = None, node_pos: Tensor | None = None) -> TreePlan:
    """The plan of the branch- and thread-count-invariant mode (docs/errors.md, "Determinism").

    Pass it as ``tree_attention(q, k_cache, v_cache, meta, plan=plan)``; build it once per step (like
    any plan) and reuse it in every layer. A query row's ``out`` and ``lse`` are then bitwise the same
    whether its group is computed alone or together with other groups of the same forest and cache,
    and whatever ``torch.get_num_threads()`` / the GPU's SM count was when the plan was built or run,
    because nothing in the plan that decides a row's arithmetic depends on the rest of the forest or on
    the device:

    * every node is cut into chunks of ``chunk_tokens`` tokens (``[c * chunk_tokens, (c + 1) *
      chunk_tokens)``), instead of the default plan's per-node chunk chosen from the whole forest's
      work and ``num_workers`` (:func:`auto_chunk_tokens`); so the partial states of a row, and the
      order in which it merges them (its nodes' ids, then chunk order), depend only on the row;
    * ``max_item_readers`` is pinned to ``rows_per_tile`` (as a :class:`PlanCapacity` plan's is), so
      the Triton kernel variant (row tile and KV block, picked from it) does not depend on how many
      readers the busiest node of this step has.

    Args:
        meta: the step's forest metadata (index tensors int32, any device; the plan lands there).
        num_qo_heads, num_kv_heads: head counts of the ``q`` and caches the plan will run with.
        head_dim: ``q.shape[-1]`` (picks the default ``rows_per_tile``).
        chunk_tokens: tokens per chunk, for every node (default :data:`INVARIANT_CHUNK_TOKENS`). Any
            fixed value is invariant; a value at least as long as every node splits nothing (one
            partial per (row, node): no split-KV parallelism within a node, fewest merges).
        rows_per_tile: readers per work item, default :func:`default_rows_per_tile` (valid on every
            backend; the cpu backend's own plans put up to ``backends.cpu.MAX_ITEM_ROWS`` packed rows
            in one item, and a caller may pass that for it). It does not change the invariance.
        capacity: pad the arrays to fixed sizes (CUDA graphs), as in :func:`plan_tree_attention`.
        impl: ``"cpp"``, ``"torch"`` or None, as in :func:`plan_tree_attention` (identical plans).
        window, node_pos: a sliding window, as in :func:`plan_tree_attention` (a row's window depends
            only on its own positions, so the invariance holds).

    Returns:
        a :class:`TreePlan` (int32 tensors on ``meta.device``) with ``num_workers == 0`` (no chunk was
        chosen for a device) and ``max_item_readers == rows_per_tile``.

    Cost, against the default plan: wherever the default plan would not split a node (few threads, a
    short node, a node with many readers) this one still cuts it every ``chunk_tokens`` tokens, so a
    row writes one fp32 partial state (``head_dim + 1`` floats per query head) per chunk it sees and
    is merged: more workspace and merge work; a long causal extend or prefill gets one partial per
    ``chunk_tokens`` keys of each row (workspace quadratic in its length; use a larger
    ``chunk_tokens`` there). On Triton the row tile is always the one of ``rows_per_tile`` readers,
    even when the step's nodes have fewer.
    """
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        # (None would be the default, forest- and device-dependent plan)
        raise MetadataError(f"chunk_tokens: expected a positive int, got {chunk_tokens!r}")
    plan = plan_tree_attention(meta, num_qo_heads, num_kv_heads, chunk_tokens=chunk_tokens,
                               rows_per_tile=rows_per_tile, head_dim=head_dim, capacity=capacity,
                               impl=impl, window=window, node_pos=node_pos)
    if plan.max_item_readers == plan.rows_per_tile:
        return plan
    ints = dict(zip(INT_FIELDS, plan.ints(), strict=True))
    ints["max_item_readers"] = plan.rows_per_tile
    return TreePlan.from_lists(plan.tensors(), [ints[f] for f in INT_FIELDS])


def _pad_plan(plan: TreePlan, capacity: PlanCapacity, total_q: int) -> TreePlan:
    """Pad ``plan``'s arrays to ``capacity`` (fixed shapes for a captured CUDA graph)."""
    pad = capacity.sizes(total_q)
    if plan.num_partials > capacity.partials:
        raise MetadataError(f"capacity.partials: plan needs {plan.num_partials}, capacity is "
                            f"{capacity.partials}")
    arrays = {f: getattr(plan, f) for f in TENSOR_FIELDS}
    for f, (size, value, name) in pad.items():
        arrays[f] = _pad(arrays[f], size, value, name)
    ints = dict(zip(INT_FIELDS, plan.ints(), strict=True))
    # fixed buffers may be replayed with another step's plan (copy_into): size the kernels' row tile
    # and the workspace for the worst case, not for this step
    ints["max_item_readers"] = plan.rows_per_tile
    ints["workspace_slots"] = capacity.partials
    return TreePlan.from_lists([arrays[f] for f in TENSOR_FIELDS], [ints[f] for f in INT_FIELDS])


def _plan_torch(meta: ForestMetadata, group: int, num_kv_heads: int, chunk_tokens: int | None,
                rows_per_tile: int, num_workers: int, window: int | None = None,
                node_pos: Tensor | None = None) -> TreePlan:
    """The planner in vectorized torch (repeat_interleave / cumsum / sort), on the metadata's device."""
    dev = meta.device
    N, G = meta.num_nodes, meta.num_groups
    node_len = meta.node_len.long()
    qo = meta.qo_indptr.long()
    vi = meta.vis_indptr.long()
    vis = meta.vis_nodes.long()
    V = vis.numel()
    total_q = int(qo[-1]) if qo.numel() else 0

    # ---- readers: expand every visibility entry e = (g, n) over the q_len rows of g.
    q_len = qo[1:] - qo[:-1]
    vis_cnt = vi[1:] - vi[:-1]
    entry_group = torch.repeat_interleave(torch.arange(G, device=dev), vis_cnt, output_size=V)
    entry_is_own = torch.arange(V, device=dev) == (vi[1:] - 1)[entry_group]
    entry_rows = q_len[entry_group] * (node_len[vis] > 0)
    R = int(entry_rows.sum()) if V else 0
    e = torch.repeat_interleave(torch.arange(V, device=dev), entry_rows, output_size=R)
    local = torch.arange(R, device=dev) - _exclusive_cumsum(entry_rows)[:-1][e]  # row index i in g
    g = entry_group[e]
    row = qo[g] + local
    node = vis[e]
    nl = node_len[node]
    full = ~entry_is_own[e]
    if meta.own_full is not None:
        full = full | meta.own_full[g]
    limit = torch.where(full, nl, nl - q_len[g] + local + 1)
    if window is not None:
        # lo = max(0, pos(row) - node_pos[n] - window + 1); a reader with lo >= limit sees nothing
        pos = node_pos.long()
        own = vis[(vi[1:] - 1).clamp(min=0)][g]
        rpos = pos[own] + node_len[own] - q_len[g] + local
        lo = torch.clamp(rpos - pos[node] - window + 1, min=0)
        keep = lo < limit
        row, node, limit, lo = row[keep], node[keep], limit[keep], lo[keep]
        R = row.numel()
    else:
        lo = torch.zeros_like(limit)

    # ---- chunk length of every node, chunks each reader sees, partials of every row.
    n_readers = torch.bincount(node, minlength=N)[:N]
    if chunk_tokens is None:
        span = None
        if window is not None:
            lo_min = torch.full((N,), 0, dtype=torch.int64, device=dev).scatter_reduce_(
                0, node, lo, "amin", include_self=False)
            span = node_len - lo_min
        chunk_n = auto_chunk_tokens(node_len, n_readers, rows_per_tile, group, num_kv_heads,
                                    num_workers, span)
        has = n_readers > 0
        plan_chunk = int(chunk_n[has].max()) if bool(has.any()) else 1
    else:
        chunk_n = torch.full((N,), chunk_tokens, dtype=torch.int64, device=dev)
        plan_chunk = chunk_tokens
    k_hi = _ceil_div(limit, chunk_n[node])  # chunks k_lo .. k_hi - 1 of the node are visible
    k_lo = torch.div(lo, chunk_n[node], rounding_mode="floor")
    k = k_hi - k_lo
    row_cnt = torch.zeros(total_q, dtype=torch.int64, device=dev).index_add_(0, row, k)
    direct = row_cnt[row] == 1  # the row's only partial: written to out, no workspace slot

    # ---- reader order: (node, merged before direct, limit descending, lo descending, row). Without a
    # window the readers of chunk c >= 1 (limit > c * chunk; never direct) are a prefix of the node's.
    lmax = int(limit.max()) + 1 if R else 1
    o1 = torch.argsort(row, stable=True)
    o1 = o1[torch.argsort(lmax - 1 - lo[o1], stable=True)]
    key = (node * 2 + direct.long()) * lmax + (lmax - 1 - limit)
    order = o1[torch.argsort(key[o1], stable=True)]
    reader_row, reader_limit, reader_lo = row[order], limit[order], lo[order]
    reader_klo, reader_k = k_lo[order], k[order]
    reader_node, reader_direct = node[order], direct[order]

    # ---- (node, chunk) pairs: chunks 0 .. max k_hi - 1 of every node with readers.
    maxk = torch.zeros(N, dtype=torch.int64, device=dev).scatter_reduce_(0, reader_node,
                                                                          reader_klo + reader_k, "amax")
    pair_off = _exclusive_cumsum(maxk)

    # ---- (reader, chunk) partials in (node, chunk, reader) order; items are the maximal runs of
    # consecutive readers of one (node, chunk), cut into tiles of rows_per_tile.
    E = int(reader_k.sum()) if R else 0
    er = torch.repeat_interleave(torch.arange(R, device=dev), reader_k, output_size=E)
    ec = reader_klo[er] + torch.arange(E, device=dev) - _exclusive_cumsum(reader_k)[:-1][er]
    epair = pair_off[:-1][reader_node[er]] + ec
    eo = torch.argsort(epair, stable=True)  # er is increasing: stable keeps reader order per pair
    er, epair = er[eo], epair[eo]
    brk = torch.ones(E, dtype=torch.bool, device=dev)
    if E > 1:
        brk[1:] = (epair[1:] != epair[:-1]) | (er[1:] != er[:-1] + 1)
    run_id = torch.cumsum(brk.long(), 0) - 1
    run_start = brk.nonzero().flatten()
    in_run = torch.arange(E, device=dev) - run_start[run_id]
    first = in_run % rows_per_tile == 0  # the first partial of each item
    item_e = first.nonzero().flatten()
    W = item_e.numel()
    run_len = torch.diff(torch.cat([run_start, run_start.new_tensor([E])]))
    item_run = run_id[item_e]
    item_num_readers = torch.clamp(run_len[item_run] - in_run[item_e], max=rows_per_tile)
    item_reader_start = er[item_e]
    item_node = reader_node[item_reader_start]
    ch = chunk_n[item_node]
    item_kv_start = (epair[item_e] - pair_off[:-1][item_node]) * ch
    item_kv_len = torch.minimum(node_len[item_node] - item_kv_start, ch)

    # ---- workspace slots: the merged readers of an item come first; reader j < merged_w of item w
    # writes slot item_partial_start[w] + j.
    mcs = _exclusive_cumsum((~reader_direct).long())
    merged = mcs[item_reader_start + item_num_readers] - mcs[item_reader_start]
    item_partial_start = _exclusive_cumsum(merged)
    P = int(item_partial_start[-1])
    item_partial_start = item_partial_start[:-1]
    p_item = torch.repeat_interleave(torch.arange(W, device=dev), merged, output_size=P)
    p_reader = item_reader_start[p_item] + torch.arange(P, device=dev) - item_partial_start[p_item]
    d_rows = reader_row[reader_direct]
    e_rows = torch.cat([reader_row[p_reader], d_rows])
    e_vals = torch.cat([torch.arange(P, device=dev), torch.full_like(d_rows, -1)])
    row_partial_indices = e_vals[torch.argsort(e_rows, stable=True)]
    row_partial_indptr = _exclusive_cumsum(row_cnt)
    merge_rows = (row_cnt != 1).nonzero().flatten()
    max_item_readers = int(item_num_readers.max()) if W else 0

    i32 = torch.int32
    arrays = dict(
        reader_row=reader_row, reader_limit=reader_limit, reader_lo=reader_lo, item_node=item_node,
        item_kv_start=item_kv_start, item_kv_len=item_kv_len, item_reader_start=item_reader_start,
        item_num_readers=item_num_readers, item_partial_start=item_partial_start,
        row_partial_indptr=row_partial_indptr, row_partial_indices=row_partial_indices,
        merge_rows=merge_rows,
    )
    ints = dict(num_readers=R, num_items=W, num_partials=P, num_merge_rows=merge_rows.numel(),
                max_item_readers=max_item_readers, chunk_tokens=plan_chunk, rows_per_tile=rows_per_tile,
                workspace_slots=P, num_workers=num_workers if chunk_tokens is None else 0,
                window=window or 0)
    return TreePlan.from_lists([arrays[f].to(i32) for f in TENSOR_FIELDS], [ints[f] for f in INT_FIELDS])


def plan_loaded_tokens(plan: TreePlan) -> int:
    """K/V tokens the kernels load for one KV head according to ``plan``: per item, its chunk from the
    smallest ``reader_lo`` to the largest ``reader_limit`` of its readers (what the planning benchmark
    and the byte rule of tiny-node absorption count; the kernels' own counters measure it at the
    loads)."""
    W = plan.num_items
    if W == 0:
        return 0
    dev = plan.item_num_readers.device
    nr = plan.item_num_readers[:W].long()
    item = torch.repeat_interleave(torch.arange(W, device=dev), nr)
    j = torch.arange(item.numel(), device=dev) - (torch.cumsum(nr, 0) - nr)[item]
    idx = plan.item_reader_start[:W].long()[item] + j
    lim = plan.reader_limit.long()[idx]
    hi = torch.zeros(W, dtype=torch.long, device=dev).scatter_reduce_(0, item, lim, "amax")
    start, ln = plan.item_kv_start[:W].long(), plan.item_kv_len[:W].long()
    lo = plan.reader_lo.long()[idx]
    lo_min = torch.zeros(W, dtype=torch.long, device=dev).scatter_reduce_(0, item, lo, "amin",
                                                                          include_self=False)
    lo_min = torch.maximum(lo_min, start)
    return int(torch.clamp(torch.minimum(hi, start + ln) - lo_min, min=0).sum())


def plan_kv_tokens(meta: ForestMetadata) -> int:
    """Unique KV tokens the step must read: tokens of nodes that at least one query row sees."""
    vi = meta.vis_indptr.long()
    q_len = (meta.qo_indptr[1:] - meta.qo_indptr[:-1]).long()
    cnt = vi[1:] - vi[:-1]
    rows_of_entry = torch.repeat_interleave(q_len, cnt, output_size=meta.vis_nodes.numel())
    seen = torch.zeros(meta.num_nodes, dtype=torch.bool, device=meta.device)
    seen[meta.vis_nodes.long()[rows_of_entry > 0]] = True
    return int(meta.node_len.long()[seen].sum())

