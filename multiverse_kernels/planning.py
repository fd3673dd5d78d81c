"""Planning: turn forest metadata into a work list for the fast kernels (docs/design.md §4, docs/plan.md).

A *reader* is one (query row, visible node) pair with a non-empty node. A *work item* is (a chunk of
one node's tokens, a contiguous run of at most ``rows_per_tile`` of that node's readers); it runs for
one KV head with the GQA heads of its readers packed into the row dimension, loads the chunk's K/V
once and writes one partial state ``(out, lse)`` per reader. Each query row then merges its partials.

Everything is built with vectorized torch (repeat_interleave / cumsum / sort), no Python loops over
tokens, rows or nodes, on the metadata's device. The exact format is documented in docs/plan.md; the
Triton and the C++/CUDA backends both consume it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .metadata import ForestMetadata, MetadataError

__all__ = ["TreePlan", "PlanCapacity", "plan_tree_attention", "cached_plan", "DEFAULT_CHUNK_TOKENS",
           "default_rows_per_tile"]

DEFAULT_CHUNK_TOKENS = 512
# Packed (reader x GQA head) rows per work item the kernels are compiled for, by head_dim.
MAX_TILE_ROWS = {64: 64, 128: 64, 256: 32}


def default_rows_per_tile(num_qo_heads: int, num_kv_heads: int, head_dim: int = 128) -> int:
    """Readers per work item such that readers x GQA group fills the kernel's row tile (>= 1)."""
    group = num_qo_heads // max(num_kv_heads, 1)
    return max(1, MAX_TILE_ROWS.get(head_dim, 64) // max(group, 1))


@dataclass(frozen=True)
class PlanCapacity:
    """Fixed sizes to pad a plan to, so buffers (and a CUDA graph over the run step) can be reused.

    readers >= R, items >= W, partials >= P, merge_rows >= M of every plan built with this capacity.
    """

    readers: int
    items: int
    partials: int
    merge_rows: int


@dataclass(frozen=True)
class TreePlan:
    """The work list of one step; int32 tensors on the metadata's device. See docs/plan.md.

    Tensor fields (sizes are the padded capacities when built with a :class:`PlanCapacity`)::

        reader_row          [R]   query row of each reader (readers sorted by node, then row)
        reader_limit        [R]   leading tokens of the node the row sees
        item_node           [W]   node of each work item
        item_kv_start       [W]   first token of the item's chunk
        item_kv_len         [W]   tokens in the chunk
        item_reader_start   [W]   first reader of the item (index into reader_*)
        item_num_readers    [W]   readers of the item (<= rows_per_tile; 0 for a padding item)
        item_partial_start  [W]   reader j of the item writes partial slot item_partial_start + j
        row_partial_indptr  [total_q + 1]  row r merges partial slots
        row_partial_indices [P]            row_partial_indices[indptr[r]:indptr[r+1]]
        merge_rows          [M]   rows with != 1 partials (-1 for padding); rows with exactly one
                                  partial are written straight to out by the attention kernel
    """

    reader_row: Tensor
    reader_limit: Tensor
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

    TENSOR_FIELDS = ("reader_row", "reader_limit", "item_node", "item_kv_start", "item_kv_len",
                     "item_reader_start", "item_num_readers", "item_partial_start",
                     "row_partial_indptr", "row_partial_indices", "merge_rows")
    INT_FIELDS = ("num_readers", "num_items", "num_partials", "num_merge_rows", "max_item_readers",
                  "chunk_tokens", "rows_per_tile")

    @property
    def device(self) -> torch.device:
        return self.item_node.device

    @property
    def partial_capacity(self) -> int:
        """Partial slots the workspace must hold (>= num_partials; the padded size)."""
        return self.row_partial_indices.shape[0]

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


def _pad(t: Tensor, size: int, value: int, name: str) -> Tensor:
    if t.numel() > size:
        raise MetadataError(f"capacity.{name}: plan needs {t.numel()}, capacity is {size}")
    if t.numel() == size:
        return t
    return torch.cat([t, t.new_full((size - t.numel(),), value)])


def plan_tree_attention(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, *,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS, rows_per_tile: int | None = None,
                        head_dim: int = 128, capacity: PlanCapacity | None = None) -> TreePlan:
    """Build the work list of one step for ``meta`` (see docs/plan.md for the exact format).

    Args:
        meta: the forest metadata (index tensors int32, any device; the plan lands on that device).
        num_qo_heads, num_kv_heads: head counts (GQA ratio = num_qo_heads // num_kv_heads).
        chunk_tokens: max tokens of one node per work item (long nodes are split; split-KV).
        rows_per_tile: max readers per work item; default fills the kernel's packed row tile
            (:func:`default_rows_per_tile` for ``head_dim``).
        capacity: pad every array to these sizes (CUDA-graph friendly buffers); error if too small.
    Returns:
        a :class:`TreePlan`. Syncs with the device a few times (array sizes).
    """
    if num_kv_heads < 1 or num_qo_heads % num_kv_heads:
        raise MetadataError(f"num_kv_heads: expected a divisor of num_qo_heads={num_qo_heads}, "
                            f"got {num_kv_heads}")
    if rows_per_tile is None:
        rows_per_tile = default_rows_per_tile(num_qo_heads, num_kv_heads, head_dim)
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise MetadataError(f"chunk_tokens: expected a positive int, got {chunk_tokens!r}")
    if not isinstance(rows_per_tile, int) or rows_per_tile < 1:
        raise MetadataError(f"rows_per_tile: expected a positive int, got {rows_per_tile!r}")
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
    R0 = int(entry_rows.sum()) if V else 0
    e = torch.repeat_interleave(torch.arange(V, device=dev), entry_rows, output_size=R0)
    local = torch.arange(R0, device=dev) - _exclusive_cumsum(entry_rows)[:-1][e]  # row index i in g
    g = entry_group[e]
    row = qo[g] + local
    node = vis[e]
    nl = node_len[node]
    full = ~entry_is_own[e]
    if meta.own_full is not None:
        full = full | meta.own_full[g]
    limit = torch.where(full, nl, nl - q_len[g] + local + 1)
    # sort by (node, row); rows of one group are consecutive, so this is a total order.
    order = torch.argsort(node * (total_q + 1) + row)
    reader_node, reader_row, reader_limit = node[order], row[order], limit[order]
    R = R0

    # ---- items: per node, ceil(len / chunk) chunks x ceil(readers / tile) tiles (chunk-major).
    n_readers = torch.bincount(reader_node, minlength=N)[:N]
    node_reader_start = _exclusive_cumsum(n_readers)
    tiles = (n_readers + rows_per_tile - 1) // rows_per_tile
    chunks = torch.where(n_readers > 0, (node_len + chunk_tokens - 1) // chunk_tokens, 0)
    items_per_node = tiles * chunks
    W = int(items_per_node.sum()) if N else 0
    item_node = torch.repeat_interleave(torch.arange(N, device=dev), items_per_node, output_size=W)
    t = torch.arange(W, device=dev) - _exclusive_cumsum(items_per_node)[:-1][item_node]
    item_tiles = tiles[item_node]
    chunk, tile = t // item_tiles, t % item_tiles
    item_kv_start = chunk * chunk_tokens
    item_kv_len = torch.minimum(node_len[item_node] - item_kv_start,
                                torch.full_like(item_kv_start, chunk_tokens))
    item_reader_start = node_reader_start[item_node] + tile * rows_per_tile
    item_num_readers = torch.minimum(n_readers[item_node] - tile * rows_per_tile,
                                     torch.full_like(tile, rows_per_tile))
    item_partial_start = _exclusive_cumsum(item_num_readers)
    P = int(item_partial_start[-1])
    item_partial_start = item_partial_start[:-1]

    # ---- merge: partial slot p belongs to reader item_reader_start + j of its item.
    p_item = torch.repeat_interleave(torch.arange(W, device=dev), item_num_readers, output_size=P)
    p_reader = item_reader_start[p_item] + torch.arange(P, device=dev) - item_partial_start[p_item]
    p_row = reader_row[p_reader]
    row_partial_indices = torch.argsort(p_row, stable=True)
    row_counts = torch.bincount(p_row, minlength=total_q)[:total_q]
    row_partial_indptr = _exclusive_cumsum(row_counts)
    merge_rows = (row_counts != 1).nonzero().flatten()
    M = merge_rows.numel()
    max_item_readers = int(item_num_readers.max()) if W else 0

    i32 = torch.int32
    arrays = dict(
        reader_row=reader_row, reader_limit=reader_limit, item_node=item_node,
        item_kv_start=item_kv_start, item_kv_len=item_kv_len, item_reader_start=item_reader_start,
        item_num_readers=item_num_readers, item_partial_start=item_partial_start,
        row_partial_indptr=row_partial_indptr, row_partial_indices=row_partial_indices,
        merge_rows=merge_rows,
    )
    if capacity is not None:
        # fixed buffers may be replayed with another step's plan (copy_into): size the kernels' row
        # tile for the worst case, not for this step
        max_item_readers = rows_per_tile
        pad = dict(reader_row=(capacity.readers, 0, "readers"),
                   reader_limit=(capacity.readers, 0, "readers"),
                   row_partial_indices=(capacity.partials, 0, "partials"),
                   merge_rows=(capacity.merge_rows, -1, "merge_rows"))
        for f in ("item_node", "item_kv_start", "item_kv_len", "item_reader_start",
                  "item_num_readers", "item_partial_start"):
            pad[f] = (capacity.items, 0, "items")
        for f, (size, value, name) in pad.items():
            arrays[f] = _pad(arrays[f], size, value, name)
    arrays = {k: v.to(i32) for k, v in arrays.items()}
    return TreePlan(**arrays, num_readers=R, num_items=W, num_partials=P, num_merge_rows=M,
                    max_item_readers=max_item_readers, chunk_tokens=chunk_tokens,
                    rows_per_tile=rows_per_tile)


_CACHE: list[tuple[tuple, tuple[Tensor, ...], tuple[Tensor, ...] | None, TreePlan]] = []
_CACHE_SIZE = 8
_CACHE_LOCK = threading.Lock()


def cached_plan(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, *, head_dim: int = 128,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS, rows_per_tile: int | None = None) -> TreePlan:
    """:func:`plan_tree_attention`, memoised on the metadata's *tensors*, so that the per-layer calls of
    one step plan once even when no plan is passed and the metadata object is rebuilt from its tensors
    (as the custom op does). A small LRU of 8 entries, safe to call from several threads.

    A hit needs the same tensor objects (identity, data pointer, version counter) AND, for CPU tensors,
    the same contents: an entry keeps a copy of the index tensors and compares it on every hit (cheap:
    O(nodes + groups + pages) int32), so metadata changed in place by a route that does not bump
    torch's version counter (a ``.numpy()`` view, ``.data``, a shared buffer) is planned afresh instead
    of reusing a stale plan. On other devices (a content compare would sync) entries are keyed by
    identity, data pointer and version only: after changing GPU metadata behind torch's back, pass an
    explicit ``plan=``. Inference-mode GPU tensors (no version counter) are planned afresh every time.
    """
    ts = meta.tensors() + ((meta.own_full,) if meta.own_full is not None else ())
    on_cpu = all(t.device.type == "cpu" for t in ts)
    inference = any(t.is_inference() for t in ts)
    if inference and not on_cpu:
        return plan_tree_attention(meta, num_qo_heads, num_kv_heads, chunk_tokens=chunk_tokens,
                                   rows_per_tile=rows_per_tile, head_dim=head_dim)
    key = (tuple(id(t) for t in ts), tuple(t.data_ptr() for t in ts),
           tuple(-1 if inference else t._version for t in ts), meta.page_size, num_qo_heads,
           num_kv_heads, head_dim, chunk_tokens, rows_per_tile)
    with _CACHE_LOCK:
        for i, (k, held, copy, plan) in enumerate(_CACHE):
            if k == key and all(a is b for a, b in zip(held, ts, strict=True)) and (
                    copy is None or all(torch.equal(a, b) for a, b in zip(copy, ts, strict=True))):
                _CACHE.insert(0, _CACHE.pop(i))
                return plan
    plan = plan_tree_attention(meta, num_qo_heads, num_kv_heads, chunk_tokens=chunk_tokens,
                               rows_per_tile=rows_per_tile, head_dim=head_dim)
    copy = tuple(t.clone() for t in ts) if on_cpu else None
    with _CACHE_LOCK:
        _CACHE.insert(0, (key, ts, copy, plan))
        del _CACHE[_CACHE_SIZE:]
    return plan


def plan_kv_tokens(meta: ForestMetadata) -> int:
    """Unique KV tokens the step must read: tokens of nodes that at least one query row sees."""
    vi = meta.vis_indptr.long()
    q_len = (meta.qo_indptr[1:] - meta.qo_indptr[:-1]).long()
    cnt = vi[1:] - vi[:-1]
    rows_of_entry = torch.repeat_interleave(q_len, cnt, output_size=meta.vis_nodes.numel())
    seen = torch.zeros(meta.num_nodes, dtype=torch.bool, device=meta.device)
    seen[meta.vis_nodes.long()[rows_of_entry > 0]] = True
    return int(meta.node_len.long()[seen].sum())

