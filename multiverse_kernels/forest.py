"""``KVForest``: a host-side builder of forest metadata over a page pool, for engines and tests.

It keeps, per node, its pages, its length and its visibility list (ancestors and joined nodes, then
itself). Node ids are stable for the forest's life; emitted metadata indexes nodes by these ids (freed
nodes keep their id with no pages and length 0).

Page lifetime: a node's pages are held by the node itself until it is freed, and by every live node
that lists it in its visibility list. When the last holder goes, the pages return to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .metadata import ForestMetadata

__all__ = ["KVForest", "OutOfPages"]


class OutOfPages(RuntimeError):
    """The page pool has no free page left."""


@dataclass
class _Node:
    vis: list[int]  # visibility list, own id last
    pages: list[int] = field(default_factory=list)
    length: int = 0
    children: int = 0
    live: bool = True  # not freed by the caller
    start: int = 0  # position of the first token: a fork's child continues after its parent, a join
    # after the longest joined node (Multiverse: the conclusion follows the longest path)
    holders: set[int] = field(default_factory=set)  # live nodes that list this one (itself included)


class KVForest:
    """Host-side KV forest over a pool of ``num_pages`` pages of ``page_size`` tokens.

    Typical decode step::

        node, pos = forest.append(leaf, 1)           # allocate room for one token per leaf
        append_paged_kv(k, v, k_cache, v_cache, *forest.page_table(), node, pos)
        meta = forest.decode_metadata(leaves)
        out = tree_attention(q, k_cache, v_cache, meta)
    """

    def __init__(self, num_pages: int, page_size: int, device: torch.device | str = "cpu",
                 page_order: list[int] | None = None) -> None:
        """``page_order``: the order pages are handed out (default 0, 1, 2, ...; tests shuffle it)."""
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages: expected a positive int, got {num_pages!r}")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.device = torch.device(device)
        order = list(range(num_pages)) if page_order is None else list(page_order)
        if sorted(order) != list(range(num_pages)):
            raise ValueError("page_order: expected a permutation of range(num_pages)")
        self._free: list[int] = order[::-1]  # a stack: pops order[0], order[1], ...
        self._nodes: list[_Node] = []

    # ------------------------------------------------------------ structure
    def _new_node(self, vis_before: list[int], start: int = 0) -> int:
        nid = len(self._nodes)
        node = _Node(vis=vis_before + [nid], start=start)
        self._nodes.append(node)
        for m in node.vis:
            self._nodes[m].holders.add(nid)
        return nid

    def _check_live(self, node: int, arg: str = "node") -> _Node:
        if not 0 <= node < len(self._nodes) or not self._nodes[node].live:
            raise ValueError(f"{arg}: node {node} does not exist or was freed")
        return self._nodes[node]

    def new_sequence(self, num_tokens: int = 0) -> int:
        """Start a root node (a new prompt); allocate room for ``num_tokens``. Returns its id.

        Raises ValueError / :class:`OutOfPages` before creating anything (no node is left behind)."""
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens: expected an int >= 0, got {num_tokens!r}")
        need = -(-num_tokens // self.page_size)
        if need > len(self._free):
            raise OutOfPages(f"need {need} pages, {len(self._free)} free")
        nid = self._new_node([])
        if num_tokens:
            self.append(nid, num_tokens)
        return nid

    def fork(self, node: int, k: int) -> list[int]:
        """Create ``k`` empty children of ``node``; each sees ``node``'s list plus itself.

        ``node`` becomes frozen (no more appends), so a child never writes into its parent's pages.
        """
        parent = self._check_live(node)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive number of children, got {k!r}")
        kids = [self._new_node(list(parent.vis), parent.start + parent.length) for _ in range(k)]
        parent.children += k
        return kids

    def join(self, nodes: list[int]) -> int:
        """Create a node that sees every node in ``nodes`` and everything they see (no copy).

        The joined nodes become frozen. The new node's list is the union of theirs (first-seen order);
        its first token's position follows the longest joined node (``node_pos``: Multiverse's
        conclusion continues after the longest path).
        """
        if not nodes:
            raise ValueError("nodes: expected at least one node to join")
        vis: list[int] = []
        seen: set[int] = set()
        for n in nodes:
            for m in self._check_live(n, "nodes").vis:
                if m not in seen:
                    seen.add(m)
                    vis.append(m)
        nid = self._new_node(vis, max(self._nodes[n].start + self._nodes[n].length for n in nodes))
        for n in nodes:
            self._nodes[n].children += 1
        return nid

    def append(self, node: int, num_tokens: int) -> tuple[Tensor, Tensor]:
        """Grow ``node`` by ``num_tokens`` tokens, allocating pages as needed.

        Returns ``(token_node, token_pos)`` int32 [num_tokens] for :func:`append_paged_kv`.
        Raises :class:`OutOfPages` (changing nothing) when the pool runs dry.
        """
        nd = self._check_live(node)
        if nd.children:
            raise ValueError(f"node: node {node} has children and is frozen; fork a child to extend")
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens: expected an int >= 0, got {num_tokens!r}")
        new_len = nd.length + num_tokens
        need = -(-new_len // self.page_size) - len(nd.pages)
        if need > len(self._free):
            raise OutOfPages(f"need {need} pages, {len(self._free)} free")
        for _ in range(need):
            nd.pages.append(self._free.pop())
        start = nd.length
        nd.length = new_len
        pos = torch.arange(start, new_len, dtype=torch.int32)
        nodes = torch.full((num_tokens,), node, dtype=torch.int32)
        return nodes.to(self.device), pos.to(self.device)

    def free(self, node: int) -> None:
        """Release ``node``. Its pages (and those of nodes only it kept alive) return to the pool
        once no live node lists them."""
        nd = self._check_live(node)
        nd.live = False
        for m in nd.vis:
            holder = self._nodes[m]
            holder.holders.discard(node)
            if not holder.holders:
                self._free.extend(reversed(holder.pages))
                holder.pages = []
                holder.length = 0

    # ------------------------------------------------------------ queries
    def node_len(self, node: int) -> int:
        return self._nodes[node].length

    def visibility(self, node: int) -> list[int]:
        """The visibility list of ``node`` (own id last)."""
        return list(self._nodes[node].vis)

    def node_pages(self, node: int) -> list[int]:
        return list(self._nodes[node].pages)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_nodes(self) -> int:
        return len(self._nodes)

    def page_table(self) -> tuple[Tensor, Tensor]:
        """``(node_page_indptr, node_page_indices)`` int32 over every node id."""
        counts = [len(n.pages) for n in self._nodes]
        indptr = torch.zeros(len(counts) + 1, dtype=torch.int32)
        if counts:
            indptr[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0).to(torch.int32)
        idx = [p for n in self._nodes for p in n.pages]
        return indptr.to(self.device), torch.tensor(idx, dtype=torch.int32).to(self.device)

    # ------------------------------------------------------------ metadata
    def metadata(self, groups: list[tuple[int, int]], own_full: bool | list[bool] = False
                 ) -> ForestMetadata:
        """Metadata for query groups ``[(node, q_len), ...]``: group g reads the last ``q_len`` tokens
        of ``node`` as queries and sees ``node``'s visibility list."""
        qo, vi, vis = [0], [0], []
        for node, q_len in groups:
            nd = self._check_live(node, "groups")
            if q_len > nd.length:
                raise ValueError(f"groups: q_len {q_len} exceeds node {node}'s {nd.length} tokens")
            qo.append(qo[-1] + q_len)
            vis.extend(nd.vis)
            vi.append(len(vis))
        indptr, indices = self.page_table()
        full = None
        if own_full is not False:
            flags = [own_full] * len(groups) if isinstance(own_full, bool) else list(own_full)
            if len(flags) != len(groups):
                raise ValueError(f"own_full: expected {len(groups)} flags (one per group), got {len(flags)}")
            full = torch.tensor(flags, dtype=torch.bool, device=self.device)
        i32 = dict(dtype=torch.int32, device=self.device)
        return ForestMetadata(
            node_page_indptr=indptr,
            node_page_indices=indices,
            node_len=torch.tensor([n.length for n in self._nodes], **i32),
            qo_indptr=torch.tensor(qo, **i32),
            vis_indptr=torch.tensor(vi, **i32),
            vis_nodes=torch.tensor(vis, **i32),
            page_size=self.page_size,
            own_full=full,
            node_pos=torch.tensor([n.start for n in self._nodes], **i32),
        )

    def decode_metadata(self, leaves: list[int]) -> ForestMetadata:
        """One query row per leaf: its last token."""
        return self.metadata([(n, 1) for n in leaves])

    def extend_metadata(self, nodes: list[int], q_lens: list[int],
                        own_full: bool | list[bool] = False) -> ForestMetadata:
        """The last ``q_lens[i]`` tokens of ``nodes[i]`` as query rows."""
        if len(nodes) != len(q_lens):
            raise ValueError("q_lens: expected one entry per node")
        return self.metadata(list(zip(nodes, q_lens)), own_full)
