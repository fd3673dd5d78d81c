"""Host planning of context-parallel tree attention over a packed forest (no communication here).

A packed forest (rows = tokens, page size 1, docs/training.md) is split into contiguous token ranges,
one per rank. For rank ``r`` owning tokens ``[s, e)`` this module computes, from the metadata alone (every
rank holds the same metadata, so every rank can compute every other rank's needs and nothing is asked
for over the wire):

* the **subgroups**: each group's rows that fall in ``[s, e)``;
* the token **intervals it needs from other ranks**: the parts outside ``[s, e)`` of the nodes its rows
  see (its own node only up to its last local row when causal: later own tokens are never seen);
* what it **sends**: the parts of ``[s, e)`` every other rank needs;
* three **local forests** over page-size-1 caches: ``local`` (the rows over the rank's own K/V only),
  ``remote`` (the rows that see remote keys, over the fetched K/V only) and ``combined`` (all rows over
  ``cat(own K/V, fetched K/V)``). ``local`` + ``remote`` merged by log-sum-exp equal ``combined``.

Sliding windows (``window=W``) measure distances in the *whole* forest's positions
(:meth:`ForestMetadata.positions`): ``local`` and ``combined`` carry ``node_pos`` (each of their nodes is
one run of consecutive tokens of one forest node, at that run's position), so a window on them is the
window on the forest. ``remote`` cannot carry the rows' positions (its groups' own nodes are remote
pieces), so a windowed call runs ``combined``. A window also trims the exchange: a rank fetches only the
tokens some of its rows can see (position > the row's position - W).
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..metadata import ForestMetadata, MetadataError

__all__ = ["HostForest", "RankPlan", "host_forest", "even_token_ranges", "check_token_ranges",
           "balanced_token_ranges", "rank_plan", "needed_intervals"]

Interval = tuple[int, int]


@dataclass(frozen=True)
class HostForest:
    """A packed forest as host lists: node ``n`` holds tokens ``[start[n], start[n] + length[n])``."""

    num_tokens: int
    start: list[int]
    length: list[int]
    qo: list[int]
    vis_indptr: list[int]
    vis_nodes: list[int]
    own_full: list[bool]
    pos: list[int]   # position of each node's first token (meta.positions(): node_pos or the default)
    digest: bytes  # content hash of the metadata (for the cross-rank check and plan caching)


def host_forest(meta: ForestMetadata) -> HostForest:
    """Check that ``meta`` is a packed forest and return it as host lists (raises MetadataError).

    Packed: ``page_size == 1``; every node's first ``node_len`` pages are consecutive token ids; every
    token is a query row (``total_q`` tokens), and row ``r`` is token ``r`` (a group's rows are the last
    ``q_len`` tokens of its own node, in order)."""
    if not isinstance(meta, ForestMetadata):
        raise MetadataError(f"meta: expected a ForestMetadata, got {type(meta).__name__}")
    if meta.page_size != 1:
        raise MetadataError(f"meta.page_size: the distributed op takes a packed forest (page size 1, "
                            f"rows = tokens), got page size {meta.page_size}")
    m = meta.to("cpu")
    L = int(m.qo_indptr[-1]) if m.qo_indptr.numel() else 0
    m.validate(num_pages=L)
    h = hashlib.blake2b(digest_size=16)
    for t in m.tensors():
        h.update(t.numpy().tobytes())
        h.update(b"|")
    h.update(b"none" if m.own_full is None else m.own_full.numpy().tobytes())
    positions = m.positions()
    h.update(b"|pos|" + positions.numpy().tobytes())
    ip = m.node_page_indptr.tolist()
    pages = m.node_page_indices.tolist()
    length = m.node_len.tolist()
    start = []
    for n, ln in enumerate(length):
        s0 = pages[ip[n]] if ln > 0 else 0
        if ln > 0 and pages[ip[n]: ip[n] + ln] != list(range(s0, s0 + ln)):
            raise MetadataError(f"node_page_indices: node {n}'s tokens are not consecutive token ids "
                                f"(a packed forest stores every node contiguously)")
        start.append(s0)
    qo, vip, vis = m.qo_indptr.tolist(), m.vis_indptr.tolist(), m.vis_nodes.tolist()
    for g in range(len(qo) - 1):
        ql = qo[g + 1] - qo[g]
        if ql == 0:
            continue
        o = vis[vip[g + 1] - 1]
        if qo[g] != start[o] + length[o] - ql:
            raise MetadataError(f"qo_indptr: group {g}'s rows [{qo[g]}, {qo[g + 1]}) are not the last {ql} "
                                f"tokens [{start[o] + length[o] - ql}, {start[o] + length[o]}) of its own "
                                f"node {o} "
                                f"(a packed forest has row r = token r)")
    own_full = [False] * (len(qo) - 1) if m.own_full is None else [bool(x) for x in m.own_full.tolist()]
    return HostForest(L, start, length, qo, vip, vis, own_full, positions.tolist(), h.digest())


# ------------------------------------------------------------------------------------------ ranges
def even_token_ranges(num_tokens: int, world_size: int) -> list[Interval]:
    """The default split: ``num_tokens // world_size`` tokens per rank, the last rank takes the rest."""
    base = num_tokens // world_size
    return [(i * base, num_tokens if i == world_size - 1 else (i + 1) * base) for i in range(world_size)]


def check_token_ranges(token_ranges, num_tokens: int, world_size: int) -> list[Interval]:
    """``token_ranges`` (None: :func:`even_token_ranges`) as a list of int pairs that tile
    ``[0, num_tokens)`` in rank order; MetadataError otherwise."""
    if token_ranges is None:
        return even_token_ranges(num_tokens, world_size)
    try:
        rs = [(int(a), int(b)) for a, b in token_ranges]
    except (TypeError, ValueError) as ex:
        raise MetadataError(f"token_ranges: expected a list of (start, end) pairs, one per rank "
                            f"({ex})") from None
    if len(rs) != world_size:
        raise MetadataError(f"token_ranges: expected {world_size} (start, end) pairs (one per rank), "
                            f"got {len(rs)}")
    pos = 0
    for i, (a, b) in enumerate(rs):
        if a != pos or b < a:
            raise MetadataError(f"token_ranges: the ranges must tile [0, {num_tokens}) in rank order; "
                                f"rank {i} has [{a}, {b}), expected it to start at {pos} and not end before "
                                f"it starts")
        pos = b
    if pos != num_tokens:
        raise MetadataError(f"token_ranges: the ranges end at {pos}, expected the packed length {num_tokens}")
    return rs


def _row_costs(f: HostForest, window: int | None = None) -> Tensor:
    """int64 [L]: keys each row (token) sees (within ``window`` positions of it when given)."""
    cost = torch.zeros(f.num_tokens, dtype=torch.int64)
    for g in range(len(f.qo) - 1):
        a, b = f.qo[g], f.qo[g + 1]
        if a == b:
            continue
        lst = f.vis_nodes[f.vis_indptr[g]: f.vis_indptr[g + 1]]
        o = lst[-1]
        p0 = f.length[o] - (b - a)
        i = torch.arange(b - a)
        if window is None:
            base = sum(f.length[n] for n in lst[:-1])
            cost[a:b] = base + (f.length[o] if f.own_full[g] else torch.arange(p0 + 1, p0 + 1 + b - a))
            continue
        rp = f.pos[o] + p0 + i  # the rows' positions; a key is seen iff its position > rp - window
        c = torch.zeros(b - a, dtype=torch.int64)
        for n in lst[:-1]:
            c += f.length[n] - (rp - window + 1 - f.pos[n]).clamp(0, f.length[n])
        hi = f.length[o] if f.own_full[g] else p0 + i + 1  # own tokens [0, hi) visible by the forest
        c += (hi - (p0 + i - window + 1).clamp(min=0)).clamp(min=0)
        cost[a:b] = c
    return cost


def balanced_token_ranges(meta: ForestMetadata, world_size: int, window: int | None = None
                          ) -> list[Interval]:
    """Token ranges that give every rank about the same number of (query row, visible key) pairs, the
    attention's work, instead of the same number of tokens. For a causal tree an even token split gives
    the last rank the most work (its rows see the most keys); this split moves its start later. With
    ``window``, the pairs within the sliding window (a model mixing sliding and full layers: None, the
    full layers' work, is the safer choice)."""
    f = host_forest(meta)
    cum = torch.cumsum(_row_costs(f, window), 0)
    total = int(cum[-1]) if cum.numel() else 0
    cuts = [0]
    for i in range(1, world_size):
        target = torch.tensor([(total * i) // world_size], dtype=torch.int64)
        c = int(torch.searchsorted(cum, target)) if total else 0
        cuts.append(min(max(c, cuts[-1]), f.num_tokens))
    cuts.append(f.num_tokens)
    return [(cuts[i], cuts[i + 1]) for i in range(world_size)]


# ------------------------------------------------------------------------------------- per rank
def _merge(iv: list[Interval]) -> list[Interval]:
    out: list[list[int]] = []
    for a, b in sorted(x for x in iv if x[1] > x[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _outside(a: int, b: int, s: int, e: int) -> list[Interval]:
    """[a, b) minus [s, e)."""
    return [x for x in ((a, min(b, s)), (max(a, e), b)) if x[1] > x[0]]


@dataclass
class _Sub:
    g: int
    r0: int
    r1: int
    own: Interval             # the own node's local piece (rows at its end)
    full: bool
    local_nodes: list[int]    # other listed nodes with a local piece
    remote: list[tuple]       # keys of remote pieces: ("n", node) or ("c", own node)


def _clip(iv: list[Interval], lo: int) -> list[Interval]:
    """The parts of ``iv`` at or after token ``lo``."""
    return [(max(a, lo), b) for a, b in iv if b > max(a, lo)]


def _first_seen(f: HostForest, n: int, lo_pos: int | None) -> int:
    """The first token of node ``n`` at a position >= ``lo_pos`` (None: its first token)."""
    if lo_pos is None:
        return f.start[n]
    return f.start[n] + min(max(lo_pos - f.pos[n], 0), f.length[n])


def _subgroups(f: HostForest, s: int, e: int, window: int | None = None
               ) -> tuple[list[_Sub], dict[tuple, list[Interval]]]:
    subs: list[_Sub] = []
    raw: dict[tuple, list[Interval]] = {}   # remote parts of each piece key
    lo_of: dict[tuple, int] = {}            # key -> first token some sub of this rank can see
    wants: list[list[tuple[tuple, int]]] = []
    if e <= s:
        return subs, {}
    g = max(bisect.bisect_right(f.qo, s) - 1, 0)
    G = len(f.qo) - 1
    while g < G and f.qo[g] < e:
        a, b = f.qo[g], f.qo[g + 1]
        if b <= s or a == b:
            g += 1
            continue
        lst = f.vis_nodes[f.vis_indptr[g]: f.vis_indptr[g + 1]]
        o = lst[-1]
        S, Lo = f.start[o], f.length[o]
        r0, r1 = max(a, s), min(b, e)
        full = f.own_full[g]
        # window: a row sees keys at positions > its own - window, no upper bound; the sub's first row
        # (the smallest position) sees the most: the keys at positions >= lo_pos
        lo_pos = None if window is None else f.pos[o] + (r0 - S) - window + 1
        local_nodes, want = [], []
        for n in lst[:-1]:
            na, nb = f.start[n], f.start[n] + f.length[n]
            if min(nb, e) > max(na, s):
                local_nodes.append(n)
            out = _outside(na, nb, s, e)
            if out:
                want.append((("n", n), out, _first_seen(f, n, lo_pos)))
        if full:
            out, key = _outside(S, S + Lo, s, e), ("n", o)
        else:
            out, key = _outside(S, r1, s, e), ("c", o)
        if out:
            want.append((key, out, _first_seen(f, o, lo_pos)))
        mine = []
        for key, out, lo in want:
            if _clip(out, lo):
                raw.setdefault(key, out)
                lo_of[key] = min(lo_of.get(key, lo), lo)
                mine.append((key, lo))
        wants.append(mine)
        subs.append(_Sub(g, r0, r1, (max(S, s), r1), full, local_nodes, []))
        g += 1
    pieces = {key: _clip(raw[key], lo) for key, lo in lo_of.items()}
    for sub, mine in zip(subs, wants):
        sub.remote = [key for key, _ in mine]
    return subs, pieces


def needed_intervals(f: HostForest, s: int, e: int, window: int | None = None) -> list[Interval]:
    """Sorted disjoint token intervals outside ``[s, e)`` that the rows in ``[s, e)`` see (within
    ``window`` positions of some row when given)."""
    _, pieces = _subgroups(f, s, e, window)
    return _merge([iv for p in pieces.values() for iv in p])


@dataclass
class RankPlan:
    """One rank's exchange and local forests (index tensors on the op's device)."""

    start: int
    end: int
    send_idx: Tensor            # int64: local token indices sent, concatenated in destination rank order
    send_splits: list[int]      # tokens sent to each rank
    recv_splits: list[int]      # tokens received from each rank (the fetched buffer, in token order)
    num_fetched: int
    local: ForestMetadata | None        # all rows over the own K/V
    remote: ForestMetadata | None       # rows that see remote keys, over the fetched K/V
    remote_rows: Tensor | None          # int64: local row of each of remote's rows
    combined: ForestMetadata | None     # all rows over cat(own K/V, fetched K/V)


class _Builder:
    """Accumulates nodes (runs of page ids) and groups into a page-size-1 ForestMetadata. Nodes made by
    :meth:`nodes` carry positions (the built forest then has ``node_pos``)."""

    def __init__(self) -> None:
        self.runs: list[list[Interval]] = []
        self.pos: list[int] = []
        self.positioned = True
        self.groups: list[tuple[int, list[int], bool]] = []

    def node(self, runs: list[Interval]) -> int:
        """One node of the runs, concatenated (no positions: the forest gets none)."""
        self.runs.append(runs)
        self.pos.append(0)
        self.positioned = False
        return len(self.runs) - 1

    def nodes(self, runs: list[Interval], pos: list[int]) -> list[int]:
        """One node per run, run ``i`` starting at position ``pos[i]`` (its tokens' positions are
        consecutive; two runs of one forest node with a gap between them are not)."""
        ids = []
        for r, p in zip(runs, pos, strict=True):
            self.runs.append([r])
            self.pos.append(p)
            ids.append(len(self.runs) - 1)
        return ids

    def group(self, q_len: int, nodes: list[int], full: bool) -> None:
        self.groups.append((q_len, nodes, full))

    def build(self, device: torch.device) -> ForestMetadata:
        lens = [sum(b - a for a, b in r) for r in self.runs]
        flat = [x for r in self.runs for x in r]
        rs = torch.tensor([a for a, _ in flat], dtype=torch.int64)
        rl = torch.tensor([b - a for a, b in flat], dtype=torch.int64)
        total = int(rl.sum())
        off = torch.cumsum(rl, 0) - rl
        pages = torch.repeat_interleave(rs - off, rl, output_size=total) + torch.arange(total)
        ip = [0]
        for ln in lens:
            ip.append(ip[-1] + ln)
        qo, vip, vis = [0], [0], []
        for q_len, nodes, _ in self.groups:
            qo.append(qo[-1] + q_len)
            vis += nodes
            vip.append(len(vis))
        i32 = dict(dtype=torch.int32, device=device)
        return ForestMetadata(
            node_page_indptr=torch.tensor(ip, **i32), node_page_indices=pages.to(**i32),
            node_len=torch.tensor(lens, **i32), qo_indptr=torch.tensor(qo, **i32),
            vis_indptr=torch.tensor(vip, **i32), vis_nodes=torch.tensor(vis, **i32), page_size=1,
            own_full=torch.tensor([f for _, _, f in self.groups], dtype=torch.bool, device=device),
            node_pos=torch.tensor(self.pos, **i32) if self.positioned else None)


def rank_plan(f: HostForest, ranges: list[Interval], rank: int, device: torch.device,
              forests: tuple[str, ...] = ("local", "remote", "combined"), window: int | None = None
              ) -> RankPlan:
    """Rank ``rank``'s exchange and local forests. ``window``: fetch only the keys within the sliding
    window of some row (the forests' ``node_pos`` are the whole forest's positions either way)."""
    s, e = ranges[rank]
    n_r = e - s
    subs, pieces = _subgroups(f, s, e, window)
    need = _merge([iv for p in pieces.values() for iv in p])
    # the fetched buffer holds `need` in token order; slot of token t
    nstarts = [a for a, _ in need]
    noff = [0]
    for a, b in need:
        noff.append(noff[-1] + b - a)

    def slot(t: int) -> int:
        i = bisect.bisect_right(nstarts, t) - 1
        return noff[i] + t - nstarts[i]

    recv_splits = [sum(max(0, min(b, re) - max(a, rs_)) for a, b in need) for rs_, re in ranges]
    send_splits, send_idx = [], []
    for d, (ds, de) in enumerate(ranges):
        if d == rank or de == ds:
            send_splits.append(0)
            continue
        cnt = 0
        for a, b in needed_intervals(f, ds, de, window):
            a, b = max(a, s), min(b, e)
            if b > a:
                send_idx.append(torch.arange(a - s, b - s))
                cnt += b - a
        send_splits.append(cnt)
    send = torch.cat(send_idx) if send_idx else torch.zeros(0, dtype=torch.int64)

    local = remote = combined = None
    remote_rows = None
    if n_r > 0:
        # local: own K/V only. combined: cat(own, fetched). Shared node per listed node's local piece.
        # Every node is one run of consecutive tokens of one forest node, positioned as in the forest.
        def at(n: int, t: int) -> int:  # position of token t of forest node n
            return f.pos[n] + t - f.start[n]

        lb, cb = _Builder(), _Builder()
        lnode: dict[int, tuple[list[int], list[int]]] = {}
        cnode: dict[tuple, list[int]] = {}
        for sub in subs:
            ls, cs = [], []
            for n in sub.local_nodes:
                if n not in lnode:
                    na, nb = max(f.start[n], s), min(f.start[n] + f.length[n], e)
                    lnode[n] = (lb.nodes([(na - s, nb - s)], [at(n, na)]),
                                cb.nodes([(na - s, nb - s)], [at(n, na)]))
                ls += lnode[n][0]
                cs += lnode[n][1]
            for key in sub.remote:
                if key not in cnode:
                    cnode[key] = cb.nodes([(n_r + slot(a), n_r + slot(a) + b - a) for a, b in pieces[key]],
                                          [at(key[1], a) for a, _ in pieces[key]])
                cs += cnode[key]
            own = (sub.own[0] - s, sub.own[1] - s)
            o = f.vis_nodes[f.vis_indptr[sub.g + 1] - 1]
            ls += lb.nodes([own], [at(o, sub.own[0])])
            cs += cb.nodes([own], [at(o, sub.own[0])])
            lb.group(sub.r1 - sub.r0, ls, sub.full)
            cb.group(sub.r1 - sub.r0, cs, sub.full)
        local = lb.build(device) if "local" in forests else None
        combined = cb.build(device) if "combined" in forests else None
        # remote: the rows that see remote keys, every remote key fully visible (own_full groups whose
        # own node is a piece holding at least q_len tokens; else one node of all the pieces, rows chunked)
        rb = _Builder()
        rnode: dict[tuple, int] = {}
        rows = []
        for sub in subs:
            if not sub.remote:
                continue
            q_len = sub.r1 - sub.r0
            rows.append((sub.r0 - s, sub.r1 - s))
            ids, lens = [], []
            for key in sub.remote:
                if key not in rnode:
                    rnode[key] = rb.node([(slot(a), slot(a) + b - a) for a, b in pieces[key]])
                ids.append(rnode[key])
                lens.append(sum(b - a for a, b in pieces[key]))
            big = max(range(len(ids)), key=lambda i: lens[i])
            if lens[big] >= q_len:
                rb.group(q_len, [x for i, x in enumerate(ids) if i != big] + [ids[big]], True)
            else:
                allp = rb.node([(slot(a), slot(a) + b - a) for key in sub.remote for a, b in pieces[key]])
                tot = sum(lens)
                for c in range(0, q_len, tot):
                    rb.group(min(tot, q_len - c), [allp], True)
        if rows and "remote" in forests:
            remote = rb.build(device)
            remote_rows = torch.cat([torch.arange(a, b) for a, b in rows]).to(device)
    return RankPlan(s, e, send.to(device), send_splits, recv_splits, noff[-1], local, remote, remote_rows,
                    combined)
