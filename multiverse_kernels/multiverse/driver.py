"""A fork/join generation driver for Multiverse over a :class:`KVForest` (model-agnostic).

The driver follows a generating stream and turns its tags into forest operations:

- when a branch feeds ``</Goal>`` of a ``<Parallel>`` block, the driver forks one child node per
  ``<Outline>`` seen in that goal (at least one); each child's first token is a forced ``<Path>`` at
  position ``</Goal> position + 1``. The parent branch waits.
- when a path branch feeds its ``</Path>``, it ends; when every path of the block has ended, the driver
  joins them into a conclusion node (its visibility list is the union, nothing is copied) whose first
  token is a forced ``<Conclusion>`` at ``</Goal> position + longest path + 1``, and the parent branch
  resumes there (``</Conclusion> </Parallel>`` and what follows go into that node).
- blocks may nest inside paths and conclusions. Blocks deeper than ``max_depth`` are decoded serially:
  their paths run one after another on one branch, still as sibling nodes that cannot see each other,
  so the math (and the positions) are the same; only the parallelism is lost.

Each step the driver hands out a :class:`Batch`: the tokens to feed (one query group per live branch:
the prompt at prefill, one token per branch when decoding), their Multiverse positions, where their K/V
go (``token_node``/``token_pos`` for :func:`append_paged_kv`) and the step's :class:`ForestMetadata`.
The caller runs the model, picks one next token per group (from the row ``batch.last_rows[g]``; the
driver overrides it with forced tags where needed) and calls :meth:`MultiverseDriver.step`.

The flat token sequence of the generation in Multiverse training order (trunk, path 1, ..., path k,
conclusion, recursively) is :meth:`MultiverseDriver.sequence`; :func:`parse` of it gives the same
positions the driver used, and its ``dense_mask()`` is the attention the forest computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..forest import KVForest
from ..metadata import ForestMetadata
from .tags import MultiverseTags

__all__ = ["MultiverseDriver", "Batch", "DriverError", "BranchInfo"]


class DriverError(ValueError):
    """A token that breaks the Multiverse structure; names the branch, its node and the token.
    The step is not rolled back: the generation cannot continue after it."""


@dataclass
class _Frame:
    """An open ``<Parallel>`` block on a branch."""

    depth: int
    goal_open: bool = False
    goal_done: bool = False
    outlines: int = 0
    concl_open: bool = False


@dataclass
class _Fork:
    """A block whose paths are being decoded."""

    frame: _Frame
    trunk: int  # node that holds </Goal>
    goal_end_pos: int
    num_paths: int
    serial: bool
    parent: _Branch
    path_nodes: list[int] = field(default_factory=list)  # first node of each path (flat order)
    end_nodes: dict[int, int] = field(default_factory=dict)  # path index -> node holding its </Path>
    path_end_pos: dict[int, int] = field(default_factory=dict)  # path index -> position of </Path>
    started: int = 0
    live: int = 0


@dataclass
class _Branch:
    bid: int
    node: int
    next_pos: int
    kind: str  # "trunk", "path" or "conclusion"
    base_depth: int = 0  # depth of the block this branch is a path of (0: none)
    frames: list[_Frame] = field(default_factory=list)
    fork: _Fork | None = None  # the block this branch is a path of
    path_index: int = -1  # which path of that block
    pending: list[int] = field(default_factory=list)
    forced: int = 0  # how many leading pending tokens are structural (driver-forced)
    event: str | None = None  # "fork" or "path_end" after the last feed
    state: str = "live"  # "live", "waiting" (parent of a fork), "done" (path ended)
    fed_in_node: int = 0


@dataclass(frozen=True)
class BranchInfo:
    """What a caller may want to know about a group's branch to pick its next token."""

    branch: int
    node: int
    kind: str  # "trunk", "path" or "conclusion"
    depth: int  # nesting depth of the innermost open block (0: none)
    tokens_in_node: int  # tokens fed into the branch's current node so far
    next_position: int


@dataclass
class Batch:
    """One forward pass. T tokens in G groups (one per live branch), groups in ``branches`` order.

    input_ids int64 [T]; position_ids int64 [T]; token_node/token_pos int32 [T] (for
    :func:`append_paged_kv`); meta: the step's forest metadata (group g's rows = its fed tokens, the
    last ones of its node); last_rows int64 [G]: the row whose logits pick group g's next token.
    """

    input_ids: Tensor
    position_ids: Tensor
    token_node: Tensor
    token_pos: Tensor
    meta: ForestMetadata
    last_rows: Tensor
    branches: list[BranchInfo]


class MultiverseDriver:
    """Fork/join Multiverse generation over a page pool.

    Args:
        tags: the tag token ids.
        num_pages, page_size: the page pool (page size 1: SGLang-style token pool; 16: FlashInfer-style).
        max_depth: blocks nested deeper than this are decoded serially (None: no limit).
        device: where metadata tensors go.
    """

    def __init__(self, tags: MultiverseTags, num_pages: int, page_size: int = 1,
                 max_depth: int | None = None, device: torch.device | str = "cpu",
                 page_order: list[int] | None = None) -> None:
        if max_depth is not None and max_depth < 0:
            raise ValueError(f"max_depth: expected None or >= 0, got {max_depth}")
        self.tags = tags
        self.max_depth = max_depth
        self.forest = KVForest(num_pages, page_size, device=device, page_order=page_order)
        self._branches: list[_Branch] = []
        self._node_tokens: dict[int, list[int]] = {}
        self._node_pos: dict[int, list[int]] = {}
        self._node_forks: dict[int, list[int]] = {}  # trunk node -> path nodes (in order)
        self._node_next: dict[int, int] = {}  # trunk node -> conclusion node
        self._root: int | None = None
        self._last: list[_Branch] = []
        self._next_bid = 0
        self.num_forks = 0
        self.num_joins = 0

    # ------------------------------------------------------------ public
    @property
    def device(self) -> torch.device:
        return self.forest.device

    def start(self, prompt: list[int] | Tensor) -> Batch:
        """Prefill: the prompt as one group of a root node. The prompt may open blocks and goals but
        holds no ``<Path>``; if it ends with ``</Goal>`` the driver forks right after this step."""
        if self._root is not None:
            raise RuntimeError("start: this driver already started a generation")
        toks = [int(t) for t in torch.as_tensor(prompt).flatten().tolist()]
        if not toks:
            raise ValueError("prompt: expected at least one token")
        root = self.forest.new_sequence()
        self._root = root
        self._node_tokens[root], self._node_pos[root] = [], []
        br = _Branch(bid=0, node=root, next_pos=0, kind="trunk", pending=toks)
        self._branches.append(br)
        return self._make_batch()

    def step(self, next_tokens: list[int | list[int]] | Tensor) -> Batch | None:
        """Give the chosen next token of every group of the last batch (in its order); returns the next
        batch, or None when no branch is left to feed. Chosen tokens of branches that fork or end a
        path are ignored (those branches wait or end).

        An entry may be a list of tokens (known tokens, e.g. forced tags or draft tokens to verify):
        they are fed together as an *extend* step (q_len > 1) of that branch. ``</Goal>`` and
        ``</Path>`` may only end such a list.
        """
        if isinstance(next_tokens, Tensor):
            next_tokens = next_tokens.flatten().tolist()
        nxt = [[int(t)] if not isinstance(t, (list, tuple)) else [int(x) for x in t] for t in next_tokens]
        if any(not t for t in nxt):
            raise ValueError("next_tokens: an entry is an empty list")
        if len(nxt) != len(self._last):
            raise ValueError(
                f"next_tokens: expected {len(self._last)} tokens (one per group), got {len(nxt)}")
        for br, tok in zip(self._last, nxt):
            ev, br.event = br.event, None
            if ev == "fork":
                self._fork(br)
            elif ev == "path_end":
                self._end_path(br)
            elif br.state == "live":
                br.pending = tok
        return self._make_batch()

    def banned_tokens(self, group: int) -> list[int]:
        """Tag ids that group ``group`` of the last batch must not pick as its next token: feeding one
        would raise :class:`DriverError`. ``<Path>`` and ``<Conclusion>`` (the driver forces them),
        closers of nothing open, ``</Path>`` while a block inside the path is open, a second ``<Goal>``.
        For samplers: mask these logits and every choice is structurally valid."""
        if not 0 <= group < len(self._last):
            raise ValueError(f"group: expected 0 <= group < {len(self._last)}, got {group}")
        T = self.tags
        br = self._last[group]
        fr = br.frames[-1] if br.frames else None
        banned = [T.path_start, T.conclusion_start]
        if fr is None or fr.goal_open or fr.concl_open:
            banned.append(T.parallel_end)
        if fr is None or fr.goal_open or fr.goal_done:
            banned.append(T.goal_start)
        if fr is None or not fr.goal_open:
            banned.append(T.goal_end)
        if br.fork is None or fr is not None:
            banned.append(T.path_end)
        if fr is None or not fr.concl_open:
            banned.append(T.conclusion_end)
        return banned

    def branch_tokens(self, branch: int) -> list[int]:
        """Tokens of the path (or trunk) a branch decoded into its current node."""
        return list(self._node_tokens[self._branch(branch).node])

    def node_tokens(self, node: int) -> tuple[list[int], list[int]]:
        """(token ids, positions) fed into ``node``."""
        return list(self._node_tokens[node]), list(self._node_pos[node])

    def sequence(self) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """The generation flattened in Multiverse training order.

        Returns token_ids int64 [L], position_ids int64 [L] (the positions the driver used) and, per
        node, int64 flat indices of its tokens (node token j is flat token ``index[node][j]``)."""
        ids: list[int] = []
        pos: list[int] = []
        index: dict[int, Tensor] = {}
        if self._root is None:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), index
        work = [self._root]
        while work:  # depth-first: node, its paths (each with its subtree), its conclusion
            n = work.pop()
            index[n] = torch.arange(len(ids), len(ids) + len(self._node_tokens[n]), dtype=torch.int64)
            ids += self._node_tokens[n]
            pos += self._node_pos[n]
            nxt = list(self._node_forks.get(n, []))
            if n in self._node_next:
                nxt.append(self._node_next[n])
            work.extend(reversed(nxt))
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64), index

    def unique_kv_tokens(self) -> int:
        """Tokens held in the forest (each stored once)."""
        return sum(len(t) for t in self._node_tokens.values())

    # ------------------------------------------------------------ internals
    def _branch(self, bid: int) -> _Branch:
        for b in self._branches:
            if b.bid == bid:
                return b
        raise ValueError(f"branch: no branch {bid}")

    def _new_branch(self, node: int, pos: int, kind: str, base_depth: int, fork: _Fork | None,
                    pending: list[int], forced: int, after: _Branch) -> _Branch:
        self._next_bid += 1
        br = _Branch(bid=self._next_bid, node=node, next_pos=pos, kind=kind,
                     base_depth=base_depth, fork=fork, pending=pending, forced=forced)
        self._node_tokens[node], self._node_pos[node] = [], []
        # keep generation order stable: children right after their parent / previous sibling
        self._branches.insert(self._branches.index(after) + 1, br)
        return br

    def _err(self, br: _Branch, i: int, msg: str) -> DriverError:
        name = self.tags.name_of(br.pending[i]) if i < len(br.pending) else None
        tok = f"{name or br.pending[i]}"
        return DriverError(f"branch {br.bid} (node {br.node}), token {br.fed_in_node + i} of the node "
                           f"({tok}): {msg}")

    def _check_feed(self, br: _Branch) -> None:
        """Apply the structure of ``br.pending`` (before feeding it); set ``br.event``."""
        T = self.tags
        n = len(br.pending)
        for i, t in enumerate(br.pending):
            forced = i < br.forced
            fr = br.frames[-1] if br.frames else None
            if t == T.parallel_start:
                br.frames.append(_Frame(depth=br.base_depth + len(br.frames) + 1))
            elif t == T.parallel_end:
                if fr is None:
                    raise self._err(br, i, "</Parallel> while a path is open" if br.fork else
                                    "</Parallel> without <Parallel>")
                if fr.goal_open or fr.concl_open:
                    raise self._err(br, i, "</Parallel> while a <Goal> or <Conclusion> is open")
                br.frames.pop()
            elif t == T.goal_start:
                if fr is None or fr.goal_open or fr.goal_done:
                    raise self._err(br, i, "<Goal> outside a <Parallel> or a second <Goal> in a block")
                fr.goal_open = True
            elif t == T.outline_start:
                if fr is not None and fr.goal_open:
                    fr.outlines += 1
            elif t == T.goal_end:
                if fr is None or not fr.goal_open:
                    raise self._err(br, i, "</Goal> without an open <Goal>")
                fr.goal_open, fr.goal_done = False, True
                if i != n - 1:
                    raise self._err(br, i, "tokens after </Goal> in one feed: the driver forks at </Goal>")
                br.event = "fork"
            elif t == T.path_start:
                if not (forced and i == 0):
                    raise self._err(br, i, "<Path> not opened by the driver (paths start after </Goal> "
                                           "of their block)")
            elif t == T.path_end:
                if br.fork is None or fr is not None:
                    raise self._err(br, i, "</Path> without an open <Path> in the innermost <Parallel>")
                if i != n - 1:
                    raise self._err(br, i, "tokens after </Path> in one feed")
                br.event = "path_end"
            elif t == T.conclusion_start:
                if not (forced and i == 0) or fr is None:
                    raise self._err(br, i, "<Conclusion> not opened by the driver (it follows the join)")
                fr.concl_open = True
            elif t == T.conclusion_end:
                if fr is None or not fr.concl_open:
                    raise self._err(br, i, "</Conclusion> without an open <Conclusion>")
                fr.concl_open = False

    def _make_batch(self) -> Batch | None:
        fed = [b for b in self._branches if b.state == "live" and b.pending]
        self._last = fed
        if not fed:
            return None
        ids, pos, tnode, tpos, groups, last_rows, infos = [], [], [], [], [], [], []
        for br in fed:
            self._check_feed(br)
            k = len(br.pending)
            node_t, pos_t = self.forest.append(br.node, k)
            p = list(range(br.next_pos, br.next_pos + k))
            ids += br.pending
            pos += p
            tnode.append(node_t)
            tpos.append(pos_t)
            self._node_tokens[br.node] += br.pending
            self._node_pos[br.node] += p
            groups.append((br.node, k))
            last_rows.append(len(ids) - 1)
            br.next_pos += k
            br.fed_in_node += k
            br.pending, br.forced = [], 0
            infos.append(BranchInfo(br.bid, br.node, br.kind, br.base_depth + len(br.frames),
                                    br.fed_in_node, br.next_pos))
        dev = self.device
        return Batch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            position_ids=torch.tensor(pos, dtype=torch.int64, device=dev),
            token_node=torch.cat(tnode).to(dev),
            token_pos=torch.cat(tpos).to(dev),
            meta=self.forest.metadata(groups),
            last_rows=torch.tensor(last_rows, dtype=torch.int64, device=dev),
            branches=infos,
        )

    def _fork(self, br: _Branch) -> None:
        fr = br.frames[-1]
        serial = self.max_depth is not None and fr.depth > self.max_depth
        f = _Fork(frame=fr, trunk=br.node, goal_end_pos=br.next_pos - 1,
                  num_paths=max(1, fr.outlines), serial=serial, parent=br)
        br.state = "waiting"
        self._node_forks[br.node] = f.path_nodes
        self.num_forks += 1
        self._start_paths(f, 1 if serial else f.num_paths, after=br)

    def _start_paths(self, f: _Fork, k: int, after: _Branch) -> None:
        kids = self.forest.fork(f.trunk, k)
        prev = after
        for node in kids:
            prev = self._new_branch(node, f.goal_end_pos + 1, "path", f.frame.depth, f,
                                    [self.tags.path_start], 1, after=prev)
            prev.path_index = len(f.path_nodes)
            f.path_nodes.append(node)
        f.started += k
        f.live += k

    def _end_path(self, br: _Branch) -> None:
        f = br.fork
        assert f is not None
        br.state = "done"
        f.path_end_pos[br.path_index] = br.next_pos - 1
        f.end_nodes[br.path_index] = br.node
        f.live -= 1
        if f.serial and f.started < f.num_paths:
            self._start_paths(f, 1, after=br)
        elif f.live == 0:
            self._join(f)
        self._branches.remove(br)

    def _join(self, f: _Fork) -> None:
        c = self.forest.join([f.end_nodes[i] for i in sorted(f.end_nodes)])  # in path order
        self.num_joins += 1
        longest = max(e - f.goal_end_pos for e in f.path_end_pos.values())
        par = f.parent
        self._node_next[f.trunk] = c
        self._node_tokens[c], self._node_pos[c] = [], []
        par.node, par.next_pos = c, f.goal_end_pos + longest + 1
        par.kind = "conclusion" if par.fork is None else "path"  # a nested conclusion stays in its path
        par.pending, par.forced, par.state, par.fed_in_node = [self.tags.conclusion_start], 1, "live", 0
