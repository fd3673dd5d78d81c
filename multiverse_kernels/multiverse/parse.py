"""Parse a Multiverse token sequence: positions, visibility, and the packed-training forest.

Semantics (the Multiverse training recipe):

- **Attention** is causal, except that within one ``<Parallel>`` block the spans ``<Path> ... </Path>``
  (markers included) cannot see each other, at any nesting depth. Tokens outside every path span of a
  block (its goal, the gaps between paths, its conclusion) see everything before them.
- **Positions** are consecutive, except that at a ``<Path>`` token they restart at (the block's
  ``</Goal>`` position + 1), and at a ``<Conclusion>`` token at (``</Goal>`` position + the block's longest
  path + 1); a path's length is its ``</Path>`` position minus the ``</Goal>`` position. A block with no
  ``</Goal>`` before its paths does not restart (its paths and its conclusion count on consecutively);
  a ``<Conclusion>`` before any restarted path of its block does not restart either. Nested blocks keep
  their own state.

The parser walks only the tag tokens (a Python loop over tags, never over ordinary tokens) and computes
positions vectorized from the restart points. The packed-training forest has one node per maximal span of
tokens inside the same set of paths: the sequence is cut at every ``<Path>`` and after every ``</Path>``.
Each node is its own query group (``q_len = node_len``) and sees every earlier node that is not in a
sibling path of a block it is in. Its metadata is O(nodes + visibility entries); the visibility lists
hold at most N (N + 1) / 2 entries for N nodes and never depend on the number of tokens. The L x L mask
exists only in :meth:`MultiverseStructure.dense_mask`, for checking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..metadata import ForestMetadata, node_start_positions
from .tags import MultiverseTags

__all__ = ["parse", "MultiverseStructure", "Block", "MultiverseParseError"]


class MultiverseParseError(ValueError):
    """Malformed Multiverse sequence. ``index`` is the offending token's index in the sequence."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"token_ids[{index}]: {message}")
        self.index = index


@dataclass
class Block:
    """One ``<Parallel>`` block. Indices are token indices into the sequence (inclusive ends).

    ``parent`` is the enclosing block's id (-1 at top level); ``parent_path`` the index of the
    enclosing block's path this block sits in (-1 if it is outside that block's paths).
    ``paths`` lists ``(start, end)`` of each ``<Path> ... </Path>`` span; ``end`` is -1 for a path left
    open by a partial sequence.
    """

    start: int
    parent: int = -1
    parent_path: int = -1
    end: int = -1
    goal_start: int = -1
    goal_end: int = -1
    goal_end_pos: int = -1
    paths: list[tuple[int, int]] = field(default_factory=list)
    outlines: int = 0
    conclusion_start: int = -1
    conclusion_end: int = -1
    # parser state
    _open_path: int = -1
    _restarted: bool = False  # the open path restarted its positions
    _longest: int = -1  # longest restarted path so far (-1: none)
    _goal_open: bool = False
    _concl_open: bool = False


@dataclass
class MultiverseStructure:
    """Result of :func:`parse` for a sequence of ``L`` tokens.

    Attributes:
        token_ids: int64 [L].
        position_ids: int64 [L], Multiverse positions (RoPE ids).
        blocks: the ``<Parallel>`` blocks in order of their ``<Parallel>`` token.
        node_start, node_len: int64 [N], the packed forest's nodes as spans of the sequence (they tile
            ``[0, L)`` in order).
        vis_indptr, vis_nodes: int64 [N + 1] and [V], node n sees ``vis_nodes[vis_indptr[n]:
            vis_indptr[n + 1]]`` (ascending, own node last).
    """

    token_ids: Tensor
    position_ids: Tensor
    blocks: list[Block]
    node_start: Tensor
    node_len: Tensor
    vis_indptr: Tensor
    vis_nodes: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def num_nodes(self) -> int:
        return int(self.node_len.numel())

    def metadata(self, device: torch.device | str | None = None) -> ForestMetadata:
        """Packed-training metadata: K/V contiguous ``[L, Hk, D]`` viewed as a page-size-1 cache
        ``[L, 1, Hk, D]`` (page id = token index); every node is its own group with
        ``q_len = node_len``, so query row i is token i."""
        device = self.token_ids.device if device is None else torch.device(device)
        i32 = dict(dtype=torch.int32, device=device)
        L = self.num_tokens
        indptr = torch.zeros(self.num_nodes + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(self.node_len, 0)
        indptr = indptr.to(**i32)
        return ForestMetadata(
            node_page_indptr=indptr,
            node_page_indices=torch.arange(L, **i32),
            node_len=self.node_len.to(**i32),
            qo_indptr=indptr.clone(),
            vis_indptr=self.vis_indptr.to(**i32),
            vis_nodes=self.vis_nodes.to(**i32),
            page_size=1,
            node_pos=node_start_positions(self.position_ids, indptr.cpu(), self.node_len).to(**i32),
        )

    def dense_mask(self) -> Tensor:
        """bool [L, L]: True where query token i may attend key token j. O(L^2): for checking only.

        Built straight from the blocks (causal, minus sibling path spans), not from the forest."""
        L = self.num_tokens
        dev = self.token_ids.device
        mask = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        for b in self.blocks:
            spans = [(s, (e if e >= 0 else L - 1) + 1) for s, e in b.paths]
            for i, (s0, e0) in enumerate(spans):
                for j, (s1, e1) in enumerate(spans):
                    if i != j:
                        mask[s0:e0, s1:e1] = False
        return mask

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, sm_scale: float | None = None,
                  backend: str = "auto", meta: ForestMetadata | None = None,
                  validate: bool = True) -> Tensor:
        """Multiverse attention of a packed sequence through :func:`tree_attention`.

        q [L, Hq, D], k/v [L, Hk, D] contiguous in sequence order (float16/bfloat16/float32/float64).
        Returns out [L, Hq, D]. ``meta`` may be passed to reuse :meth:`metadata` across layers.
        """
        from ..ops import tree_attention

        L = self.num_tokens
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 3 or t.shape[0] != L:
                raise ValueError(f"{name}: expected [{L}, heads, head_dim], got {tuple(t.shape)}")
        if meta is None:
            meta = self.metadata(q.device)
        kc = k.contiguous().view(L, 1, k.shape[1], k.shape[2])
        vc = v.contiguous().view(L, 1, v.shape[1], v.shape[2])
        return tree_attention(q, kc, vc, meta, sm_scale=sm_scale, backend=backend, validate=validate)


def parse(token_ids: Tensor | list[int], tags: MultiverseTags, *, partial: bool = False
          ) -> MultiverseStructure:
    """Parse a Multiverse token sequence.

    Args:
        token_ids: int [L] (tensor or list).
        tags: the tag token ids.
        partial: accept a prefix of a sequence (open blocks and paths at the end are fine), e.g. a
            generation in progress.
    Returns:
        :class:`MultiverseStructure` with positions, blocks, the packed forest and ``dense_mask()``.
    Raises:
        MultiverseParseError (a ValueError) naming the offending token index: ``</Path>`` without an
        open ``<Path>`` in the innermost block, ``<Path>`` outside any ``<Parallel>`` or inside an open
        path of the same block, ``</Parallel>`` while a path, goal or conclusion is open, goal and
        conclusion tags out of place (a ``<Goal>`` after a path or the conclusion, a ``<Path>`` after the
        ``<Conclusion>``, a second ``<Goal>`` or ``<Conclusion>``), and unclosed blocks, paths, goals or
        conclusions at the end.
    """
    ids = token_ids if isinstance(token_ids, Tensor) else torch.tensor(list(token_ids), dtype=torch.int64)
    if ids.dim() != 1:
        raise ValueError(f"token_ids: expected a 1-D sequence, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"token_ids: expected integer token ids, got {ids.dtype}")
    ids = ids.long()
    L = ids.numel()
    T = tags
    tag_vec = torch.tensor(T.ids(), dtype=torch.int64, device=ids.device)
    tag_idx = torch.isin(ids, tag_vec).nonzero().flatten().tolist()
    tag_val = ids[tag_idx].tolist() if tag_idx else []

    blocks: list[Block] = []
    stack: list[int] = []  # open block ids, innermost last
    seg_start, seg_pos = [0], [0]  # position restarts: token seg_start[i] has position seg_pos[i]

    def pos(t: int) -> int:
        return seg_pos[-1] + t - seg_start[-1]

    def restart(t: int, p: int) -> None:
        if seg_start[-1] == t:
            seg_pos[-1] = p
        else:
            seg_start.append(t)
            seg_pos.append(p)

    def top(t: int, what: str) -> Block:
        if not stack:
            raise MultiverseParseError(t, f"{what} outside any <Parallel>")
        return blocks[stack[-1]]

    def not_in_path(b: Block, t: int, what: str) -> None:
        if b._open_path >= 0:
            raise MultiverseParseError(
                t, f"{what} while <Path> at index {b._open_path} is open (a block inside a path needs "
                   f"its own <Parallel>)")

    for t, v in zip(tag_idx, tag_val):
        if v == T.parallel_start:
            parent = stack[-1] if stack else -1
            pp = -1
            if parent >= 0 and blocks[parent]._open_path >= 0:
                pp = len(blocks[parent].paths)
            blocks.append(Block(start=t, parent=parent, parent_path=pp))
            stack.append(len(blocks) - 1)
        elif v == T.parallel_end:
            b = top(t, "</Parallel>")
            not_in_path(b, t, "</Parallel>")
            if b._goal_open:
                raise MultiverseParseError(t, f"</Parallel> while <Goal> at index {b.goal_start} is open")
            if b._concl_open:
                raise MultiverseParseError(
                    t, f"</Parallel> while <Conclusion> at index {b.conclusion_start} is open")
            b.end = t
            stack.pop()
        elif v == T.goal_start:
            b = top(t, "<Goal>")
            not_in_path(b, t, "<Goal>")
            if b.goal_start >= 0:
                raise MultiverseParseError(t, f"second <Goal> in the block opened at index {b.start}")
            if b.paths:
                raise MultiverseParseError(
                    t, f"<Goal> after the <Path> at index {b.paths[0][0]} (a block's goal comes first)")
            if b.conclusion_start >= 0:
                raise MultiverseParseError(t, f"<Goal> after the <Conclusion> at index {b.conclusion_start}")
            b.goal_start, b._goal_open = t, True
        elif v == T.goal_end:
            b = top(t, "</Goal>")
            if not b._goal_open:
                raise MultiverseParseError(
                    t, f"</Goal> without an open <Goal> in the block at index {b.start}")
            b._goal_open = False
            b.goal_end, b.goal_end_pos = t, pos(t)
        elif v == T.outline_start:
            if stack and blocks[stack[-1]]._goal_open:
                blocks[stack[-1]].outlines += 1
        elif v == T.outline_end:
            pass  # outlines only matter to the generation driver (how many paths to fork)
        elif v == T.path_start:
            b = top(t, "<Path>")
            not_in_path(b, t, "<Path>")
            if b._goal_open:
                raise MultiverseParseError(t, f"<Path> while <Goal> at index {b.goal_start} is open")
            if b._concl_open:
                raise MultiverseParseError(
                    t, f"<Path> while <Conclusion> at index {b.conclusion_start} is open")
            if b.conclusion_start >= 0:
                raise MultiverseParseError(
                    t, f"<Path> after the <Conclusion> at index {b.conclusion_start} (paths come first)")
            b._open_path = t
            b._restarted = b.goal_end >= 0
            if b._restarted:
                restart(t, b.goal_end_pos + 1)
        elif v == T.path_end:
            if not stack or blocks[stack[-1]]._open_path < 0:
                raise MultiverseParseError(t, "</Path> without an open <Path> in the innermost <Parallel>")
            b = blocks[stack[-1]]
            b.paths.append((b._open_path, t))
            if b._restarted:
                b._longest = max(b._longest, pos(t) - b.goal_end_pos)
            b._open_path = -1
        elif v == T.conclusion_start:
            b = top(t, "<Conclusion>")
            not_in_path(b, t, "<Conclusion>")
            if b._goal_open or b._concl_open:
                raise MultiverseParseError(t, "<Conclusion> while a <Goal> or <Conclusion> is open")
            if b.conclusion_start >= 0:
                raise MultiverseParseError(
                    t, f"second <Conclusion> in the block opened at index {b.start} (the first at index "
                       f"{b.conclusion_start})")
            b.conclusion_start, b._concl_open = t, True
            if b.goal_end >= 0 and b._longest >= 0:
                restart(t, b.goal_end_pos + b._longest + 1)
        elif v == T.conclusion_end:
            b = top(t, "</Conclusion>")
            if not b._concl_open:
                raise MultiverseParseError(t, "</Conclusion> without an open <Conclusion>")
            b._concl_open = False
            b.conclusion_end = t

    if stack:
        b = blocks[stack[-1]]
        if b._open_path >= 0:
            b.paths.append((b._open_path, -1))  # an open path spans to the end
        if not partial:
            if b._open_path >= 0:
                raise MultiverseParseError(b._open_path, "unclosed <Path>")
            if b._goal_open:
                raise MultiverseParseError(b.goal_start, "unclosed <Goal>")
            if b._concl_open:
                raise MultiverseParseError(b.conclusion_start, "unclosed <Conclusion>")
            raise MultiverseParseError(b.start, "unclosed <Parallel>")
        for bid in stack[:-1]:  # outer blocks whose open path holds the inner ones
            ob = blocks[bid]
            if ob._open_path >= 0:
                ob.paths.append((ob._open_path, -1))

    # Positions, vectorized: token t in segment s has seg_pos[s] + t - seg_start[s].
    ss = torch.tensor(seg_start, dtype=torch.int64, device=ids.device)
    sp = torch.tensor(seg_pos, dtype=torch.int64, device=ids.device)
    ar = torch.arange(L, dtype=torch.int64, device=ids.device)
    seg = torch.searchsorted(ss, ar, right=True) - 1
    position_ids = sp[seg] + ar - ss[seg]

    node_start, node_len, vis_indptr, vis_nodes = _build_forest(blocks, L)
    return MultiverseStructure(ids, position_ids, blocks, node_start, node_len, vis_indptr, vis_nodes)


def _build_forest(blocks: list[Block], L: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nodes = spans cut at every path start and after every path end; visibility by node."""
    spans = [[(s, (e if e >= 0 else L - 1) + 1) for s, e in b.paths] for b in blocks]
    cuts = {0}
    for sp in spans:
        for s, e in sp:
            cuts.add(s)
            cuts.add(e)
    starts = sorted(c for c in cuts if c < L)
    N = len(starts)
    bounds = starts + [L]
    first_node = {s: n for n, s in enumerate(starts)}  # a node starts at every path start

    def node_range(s: int, e: int) -> range:
        """Nodes tiling tokens [s, e)."""
        n0 = first_node[s]
        n1 = first_node[e] if e < L else N
        return range(n0, n1)

    # Per node, the (block, path) pairs it is in; per (block, path), its nodes.
    member: list[list[tuple[int, int]]] = [[] for _ in range(N)]
    path_nodes: list[list[range]] = []
    for bi, sp in enumerate(spans):
        rs = [node_range(s, e) for s, e in sp]
        path_nodes.append(rs)
        for pi, r in enumerate(rs):
            for n in r:
                member[n].append((bi, pi))

    vis_indptr = [0]
    vis: list[int] = []
    for n in range(N):
        hidden: set[int] = set()
        for bi, pi in member[n]:
            for pj in range(pi):  # earlier siblings (later ones start after n)
                hidden.update(path_nodes[bi][pj])
        vis.extend(m for m in range(n + 1) if m not in hidden)
        vis_indptr.append(len(vis))
    i64 = dict(dtype=torch.int64)
    node_start = torch.tensor(starts, **i64)
    node_len = torch.tensor([bounds[i + 1] - bounds[i] for i in range(N)], **i64)
    return node_start, node_len, torch.tensor(vis_indptr, **i64), torch.tensor(vis, **i64)
