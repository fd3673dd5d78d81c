"""KV-forest metadata: the one format every op and backend consumes (docs/design.md §2).

A forest is a set of *nodes* (runs of tokens in the paged KV cache) and *query groups* (runs of query
rows with a visibility list of nodes). All index tensors are int32 and live on the same device as the
data they index. The format is O(nodes + groups + pages), never O(L^2).

Fields (``N`` nodes, ``G`` groups)::

    node_page_indptr   int32 [N + 1]   node n owns node_page_indices[indptr[n]:indptr[n+1]]
    node_page_indices  int32 [P]       page ids into k_cache/v_cache [num_pages, page_size, Hk, D]
    node_len           int32 [N]       tokens in node n; token j is in page j // page_size, slot j % page_size
    qo_indptr          int32 [G + 1]   group g owns query rows qo_indptr[g]:qo_indptr[g+1]
    vis_indptr         int32 [G + 1]   group g sees vis_nodes[vis_indptr[g]:vis_indptr[g+1]]
    vis_nodes          int32 [V]       the LAST listed node of a group is its own node
    page_size          int                 tokens per page
    own_full           bool  [G] or None   True: the group's own node is fully visible (bidirectional,
                                           diffusion-LM blocks); default causal
    node_pos           int32 [N] or None   position of node n's first token (sliding windows measure in
                                           positions); default: depth along the chain (default_node_pos)

Row ``i`` of group ``g`` (``q_len`` rows, own node ``o``) sees every token of every other listed node and
tokens ``0 .. node_len[o] - q_len + i`` of ``o`` (all of ``o`` when ``own_full[g]``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

__all__ = ["ForestMetadata", "MetadataError", "INDEX_FIELDS", "node_start_positions"]

INDEX_FIELDS = ("node_page_indptr", "node_page_indices", "node_len", "qo_indptr", "vis_indptr", "vis_nodes")
"""The six int32 index tensors of a forest, in op-schema order: the one list (the dataclass's fields, the
ops' schemas and the checks follow it; tests/contracts/test_plan_format.py checks the schemas)."""


def node_start_positions(position_ids: Tensor, token_indptr: Tensor, node_len: Tensor) -> Tensor:
    """int32 [N] ``node_pos`` of a packed sequence: the position of each node's first token
    (``position_ids[token_indptr[n]]``, 0 for an empty node), for nodes whose tokens are
    ``token_indptr[n]:token_indptr[n+1]`` with consecutive positions (as Multiverse parsing and the RL
    packer lay them out)."""
    lens = node_len.long().cpu()
    starts = token_indptr.long().cpu()[:-1]
    pos = position_ids.long().cpu()
    out = torch.zeros(lens.numel(), dtype=torch.int32)
    has = lens > 0
    out[has] = pos[starts[has]].to(torch.int32)
    return out


class MetadataError(ValueError):
    """Raised when forest metadata or op arguments are malformed. The message names the argument."""


def _check_index_tensor(name: str, t: Tensor, device: torch.device | None = None) -> None:
    if not isinstance(t, Tensor):
        raise MetadataError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise MetadataError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    if t.dim() != 1:
        raise MetadataError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise MetadataError(f"{name}: expected device {device}, got {t.device}")


def _check_indptr(name: str, indptr: Tensor, nnz: int, indices_name: str) -> None:
    if indptr.numel() < 1:
        raise MetadataError(f"{name}: expected at least one element (indptr of length count + 1)")
    ip = indptr.tolist()
    if ip[0] != 0:
        raise MetadataError(f"{name}: expected {name}[0] == 0, got {ip[0]}")
    if any(b < a for a, b in zip(ip, ip[1:])):
        raise MetadataError(f"{name}: expected a non-decreasing indptr")
    if ip[-1] != nnz:
        raise MetadataError(
            f"{name}: expected {name}[-1] == len({indices_name}) == {nnz}, got {ip[-1]}"
        )


@dataclass(frozen=True)
class ForestMetadata:
    """Index tensors describing a KV forest and the query groups that read it. See module docstring."""

    node_page_indptr: Tensor
    node_page_indices: Tensor
    node_len: Tensor
    qo_indptr: Tensor
    vis_indptr: Tensor
    vis_nodes: Tensor
    page_size: int
    own_full: Tensor | None = None
    node_pos: Tensor | None = None
    """int32 [num_nodes]: the position of each node's first token (token j of node n is at
    ``node_pos[n] + j``); what a sliding window measures distances in (docs/design.md, "Attention
    variants"). None: :meth:`default_node_pos`."""

    # ------------------------------------------------------------------ sizes
    @property
    def num_nodes(self) -> int:
        return self.node_len.shape[0]

    @property
    def num_groups(self) -> int:
        return self.qo_indptr.shape[0] - 1

    @property
    def total_q(self) -> int:
        """Number of query rows (host sync on GPU tensors)."""
        return int(self.qo_indptr[-1])

    @property
    def device(self) -> torch.device:
        return self.node_len.device

    def to(self, device: torch.device | str) -> ForestMetadata:
        """Copy every index tensor to ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, Tensor):
                kw[k] = v.to(device)
        return ForestMetadata(**kw)

    def with_own_full(self, own_full: Tensor | bool | None) -> ForestMetadata:
        """Return a copy whose own nodes are fully visible (True), causal (False/None), or per group."""
        if isinstance(own_full, bool):
            own_full = torch.full((self.num_groups,), own_full, dtype=torch.bool, device=self.device)
        return replace(self, own_full=own_full)

    def tensors(self) -> tuple[Tensor, ...]:
        """The six index tensors, in op-schema order (:data:`INDEX_FIELDS`)."""
        return tuple(getattr(self, f) for f in INDEX_FIELDS)

    def with_node_pos(self, node_pos: Tensor | None) -> ForestMetadata:
        """Return a copy with per-node start positions (int32 [num_nodes]) or None (the default)."""
        return replace(self, node_pos=node_pos)

    def default_node_pos(self) -> Tensor:
        """int32 [num_nodes]: positions when ``node_pos`` is None: each token's depth along its chain.

        A node starts after the nodes listed before it in the first visibility list that names it
        (lists in root-first order, as KVForest, the converters and the packers write them): on chains
        and trees that is each token's depth; a node that joins several paths starts after all of
        them (their concatenation). Multiverse positions (a conclusion continues after the *longest*
        path) and any other convention come from ``node_pos``, which
        :class:`~multiverse_kernels.KVForest`, ``multiverse.parse`` and ``rl`` fill. A node no list
        names gets 0. O(visibility entries).
        """
        dev = self.device
        N = self.num_nodes
        out = torch.zeros(N, dtype=torch.int64, device=dev)
        V = self.vis_nodes.numel()
        if N == 0 or V == 0:
            return out.to(torch.int32)
        nodes = self.vis_nodes.long()
        lens = self.node_len.long()[nodes]
        incl = torch.cumsum(lens, 0)
        cnt = (self.vis_indptr[1:] - self.vis_indptr[:-1]).long()
        start = self.vis_indptr[:-1].long()
        base = torch.repeat_interleave(torch.where(start > 0, incl[(start - 1).clamp(min=0)], 0), cnt,
                                       output_size=V)
        offset = incl - lens - base  # tokens listed before each entry in its own list
        first = torch.full((N,), V, dtype=torch.int64, device=dev)
        first.scatter_reduce_(0, nodes, torch.arange(V, device=dev), "amin")
        named = first < V
        out[named] = offset[first[named]]
        return out.to(torch.int32)

    def positions(self) -> Tensor:
        """int32 [num_nodes]: ``node_pos`` if set, else :meth:`default_node_pos`."""
        return self.node_pos if self.node_pos is not None else self.default_node_pos()

    # ------------------------------------------------------------ host views
    def q_lens(self) -> Tensor:
        """int32 [G]: rows per group."""
        return self.qo_indptr[1:] - self.qo_indptr[:-1]

    def own_nodes(self) -> Tensor:
        """int64 [G]: each group's own (last-listed) node; -1 for a group with an empty list."""
        ends = self.vis_indptr[1:].long()
        nonempty = ends > self.vis_indptr[:-1].long()
        own = torch.full_like(ends, -1)
        if bool(nonempty.any()):
            own[nonempty] = self.vis_nodes.long()[ends[nonempty] - 1]
        return own

    def node_token_slots(self, node: int) -> Tensor:
        """int64 [node_len[node]]: flat slot (page * page_size + offset) of each token of ``node``."""
        n = int(self.node_len[node])
        start = int(self.node_page_indptr[node])
        j = torch.arange(n, device=self.device)
        pages = self.node_page_indices.long()[start + j // self.page_size]
        return pages * self.page_size + j % self.page_size

    # -------------------------------------------------------------- checking
    def validate(self, num_pages: int | None = None) -> None:
        """Check every invariant of docs/design.md §2; raise :class:`MetadataError` naming the field.

        ``num_pages`` (the cache's first dimension) enables the page-range check. This syncs with the
        device; call it once per step (ops do it unless ``validate=False``).
        """
        dev = self.node_len.device
        for f in INDEX_FIELDS:
            _check_index_tensor(f, getattr(self, f), dev)
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise MetadataError(f"page_size: expected a positive int, got {self.page_size!r}")
        N, G = self.num_nodes, self.num_groups
        if self.node_page_indptr.numel() != N + 1:
            raise MetadataError(
                f"node_page_indptr: expected length num_nodes + 1 = {N + 1} (num_nodes = "
                f"len(node_len)), got {self.node_page_indptr.numel()}"
            )
        if self.vis_indptr.numel() != self.qo_indptr.numel():
            raise MetadataError(
                f"vis_indptr: expected length num_groups + 1 = {self.qo_indptr.numel()} (like "
                f"qo_indptr), got {self.vis_indptr.numel()}"
            )
        _check_indptr("node_page_indptr", self.node_page_indptr, self.node_page_indices.numel(),
                      "node_page_indices")
        _check_indptr("vis_indptr", self.vis_indptr, self.vis_nodes.numel(), "vis_nodes")
        if self.qo_indptr.numel() < 1:
            raise MetadataError("qo_indptr: expected at least one element (num_groups + 1)")
        _check_indptr("qo_indptr", self.qo_indptr, int(self.qo_indptr[-1]), "q rows")
        if N and int(self.node_len.min()) < 0:
            raise MetadataError("node_len: expected non-negative lengths")
        npages = (self.node_page_indptr[1:] - self.node_page_indptr[:-1]).long()
        need = (self.node_len.long() + self.page_size - 1) // self.page_size
        bad = (npages < need).nonzero()
        if bad.numel():
            n = int(bad[0])
            raise MetadataError(
                f"node_page_indptr: node {n} has {int(npages[n])} pages but node_len[{n}] = "
                f"{int(self.node_len[n])} needs {int(need[n])} at page_size {self.page_size}"
            )
        if self.node_page_indices.numel():
            lo = int(self.node_page_indices.min())
            hi = int(self.node_page_indices.max())
            if lo < 0 or (num_pages is not None and hi >= num_pages):
                raise MetadataError(
                    f"node_page_indices: expected page ids in [0, {num_pages}), found "
                    f"{lo if lo < 0 else hi}"
                )
        if self.vis_nodes.numel():
            lo, hi = int(self.vis_nodes.min()), int(self.vis_nodes.max())
            if lo < 0 or hi >= N:
                raise MetadataError(
                    f"vis_nodes: expected node ids in [0, {N}), found {lo if lo < 0 else hi}"
                )
        q_lens = self.q_lens().long()
        vis_cnt = (self.vis_indptr[1:] - self.vis_indptr[:-1]).long()
        empty = ((q_lens > 0) & (vis_cnt == 0)).nonzero()
        if empty.numel():
            g = int(empty[0])
            raise MetadataError(
                f"vis_nodes: group {g} has {int(q_lens[g])} query rows but an empty visibility list "
                f"(vis_indptr[{g}] == vis_indptr[{g + 1}])"
            )
        if self.vis_nodes.numel():
            # Repeats within one list: sort (group, node) keys and compare neighbours.
            gid = torch.repeat_interleave(torch.arange(G, device=dev), vis_cnt)
            key = gid * (N + 1) + self.vis_nodes.long()
            skey = key.sort().values
            rep = (skey[1:] == skey[:-1]).nonzero()
            if rep.numel():
                k = int(skey[int(rep[0])])
                raise MetadataError(
                    f"vis_nodes: group {k // (N + 1)} lists node {k % (N + 1)} more than once"
                )
        own = self.own_nodes()
        has = own >= 0
        own_len = torch.zeros_like(q_lens)
        own_len[has] = self.node_len.long()[own[has]]
        over = (q_lens > own_len).nonzero()
        if over.numel():
            g = int(over[0])
            raise MetadataError(
                f"qo_indptr: group {g} has q_len {int(q_lens[g])} but its own (last-listed) node "
                f"{int(own[g])} has only {int(own_len[g])} tokens"
            )
        if self.own_full is not None:
            of = self.own_full
            if not isinstance(of, Tensor) or of.dtype != torch.bool or of.shape != (G,):
                raise MetadataError(
                    f"own_full: expected a bool tensor of shape ({G},), got "
                    f"{getattr(of, 'dtype', type(of))} {tuple(getattr(of, 'shape', ()))}"
                )
            if of.device != dev:
                raise MetadataError(f"own_full: expected device {dev}, got {of.device}")
        if self.node_pos is not None:
            _check_index_tensor("node_pos", self.node_pos, dev)
            if self.node_pos.numel() != N:
                raise MetadataError(
                    f"node_pos: expected one start position per node ({N}), got {self.node_pos.numel()}")
            if N and int(self.node_pos.min()) < 0:
                raise MetadataError("node_pos: expected non-negative positions")
