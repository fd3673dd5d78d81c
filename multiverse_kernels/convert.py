"""Converters from the per-request formats engines already hold to forest metadata, and back.

Engines that share a prompt between requests already share its pages (FlashInfer page tables) or token
slots (SGLang's radix cache, page size 1). :func:`from_page_lists` finds that sharing: requests whose
page lists start with the same pages get a common node, split where they diverge, so each shared page
appears in exactly one node and is read once for all its readers.

The split is a recursive partition of the requests (one vectorized step per node, no per-token Python
work): find the common prefix of a set of requests, cut a node there, and partition the rest by their
next page.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .metadata import ForestMetadata, MetadataError

__all__ = ["from_page_lists", "from_flashinfer", "from_sglang", "to_flashinfer", "to_sglang"]


def from_page_lists(page_lists: list[Tensor], seq_lens: list[int], page_size: int,
                    q_lens: list[int] | None = None, device: torch.device | str | None = None
                    ) -> ForestMetadata:
    """Build a forest from per-request page lists.

    Args:
        page_lists: for each request, int [num_pages_r] page ids in token order.
        seq_lens: tokens per request (``(num_pages_r - 1) * page_size + last_page_len``).
        page_size: tokens per page.
        q_lens: query rows per request (its last q_len tokens), default 1 each.
    Returns metadata with one group per request, in request order.
    """
    return _from_page_lists(page_lists, seq_lens, page_size, q_lens, device)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_MAX_ID = 2**31 - 1  # page ids and slots are stored as int32


def _check_page_size(page_size: int) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise MetadataError(f"page_size: expected a positive int, got {page_size!r}")


def _check_ids(name: str, t: Tensor) -> None:
    """An integer tensor of ids in [0, 2^31): float ids would be truncated, large ones would wrap."""
    if not isinstance(t, Tensor):
        raise MetadataError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise MetadataError(f"{name}: expected an integer tensor, got {t.dtype}")
    if t.dim() != 1:
        raise MetadataError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > _MAX_ID:
            raise MetadataError(f"{name}: expected ids in [0, 2^31), found {lo if lo < 0 else hi}")


def _from_page_lists(page_lists, seq_lens, page_size, q_lens, device,
                     names=("page_lists", "seq_lens", "q_lens")) -> ForestMetadata:
    """:func:`from_page_lists` with the caller's argument names in the errors."""
    n_pages, n_seq, n_q = names
    _check_page_size(page_size)
    R = len(page_lists)
    for r, p in enumerate(page_lists):
        _check_ids(f"{n_pages}[{r}]", p)
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in seq_lens):
        raise MetadataError(f"{n_seq}: expected non-negative ints, got {list(seq_lens)}")
    if len(seq_lens) != R:
        raise MetadataError(f"{n_seq}: expected {R} entries (one per request), got {len(seq_lens)}")
    q_lens = [1] * R if q_lens is None else list(q_lens)
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in q_lens):
        raise MetadataError(f"{n_q}: expected non-negative ints, got {q_lens}")
    if len(q_lens) != R:
        raise MetadataError(f"{n_q}: expected {R} entries (one per request), got {len(q_lens)}")
    if device is None:
        device = page_lists[0].device if R else "cpu"
    npg = [int(p.numel()) for p in page_lists]
    for r in range(R):
        if -(-seq_lens[r] // page_size) != npg[r]:
            raise MetadataError(
                f"{n_seq}: request {r} has {seq_lens[r]} tokens but {npg[r]} pages of {page_size}")
    maxp = max(npg, default=0)
    pad = torch.full((R, maxp + 1), -1, dtype=torch.int64)
    for r, p in enumerate(page_lists):
        pad[r, : npg[r]] = p.detach().to("cpu", torch.int64)
    npg_t = torch.tensor(npg, dtype=torch.int64)

    node_pages: list[Tensor] = []
    node_len: list[int] = []
    node_vis: dict[int, list[int]] = {}  # request -> node path
    stack: list[tuple[Tensor, int, list[int]]] = [(torch.arange(R), 0, [])]
    while stack:
        reqs, start, path = stack.pop()
        if reqs.numel() == 0:
            continue
        # Common prefix of these requests from page `start` on, limited by the shortest of them.
        sub = pad[reqs, start:]
        same = (sub == sub[:1]).all(0).long()
        lcp = int(same.cumprod(0).sum())
        lcp = min(lcp, int(npg_t[reqs].min()) - start)
        end = start + lcp
        ending = reqs[npg_t[reqs] == end]
        going = reqs[npg_t[reqs] > end]
        if lcp > 0 or ending.numel():
            tok = [seq_lens[int(r)] - start * page_size for r in ending]
            if ending.numel() and (min(tok) != max(tok)):
                raise MetadataError(
                    f"{n_seq}: requests {ending.tolist()} share their last page but differ in length")
            if going.numel() and ending.numel() and tok[0] != lcp * page_size:
                raise MetadataError(
                    f"{n_pages}: request {int(ending[0])} ends inside a page that request "
                    f"{int(going[0])} continues past")
            nid = len(node_len)
            node_pages.append(pad[int(reqs[0]), start:end])
            node_len.append(tok[0] if ending.numel() else lcp * page_size)
            path = path + [nid]
            for r in ending.tolist():
                node_vis[r] = path
        if going.numel():
            nxt = pad[going, end]
            parts = [going[nxt == p] for p in torch.unique(nxt).tolist()]
            parts.sort(key=lambda t: int(t[0]))  # number nodes in request order (depth first)
            stack.extend((part, end, path) for part in reversed(parts))
    qo, vi, vis = [0], [0], []
    for r in range(R):
        path = node_vis[r]
        if q_lens[r] > node_len[path[-1]]:
            raise MetadataError(
                f"{n_q}: request {r}'s last {q_lens[r]} tokens are not all its own (only "
                f"{node_len[path[-1]]} tokens after the last page it shares)")
        qo.append(qo[-1] + q_lens[r])
        vis.extend(path)
        vi.append(len(vis))
    i32 = dict(dtype=torch.int32, device=device)
    counts = torch.tensor([p.numel() for p in node_pages], dtype=torch.int64)
    indptr = torch.zeros(len(node_pages) + 1, dtype=torch.int64)
    indptr[1:] = counts.cumsum(0)
    return ForestMetadata(
        node_page_indptr=indptr.to(**i32),
        node_page_indices=(torch.cat(node_pages) if node_pages else torch.zeros(0)).to(**i32),
        node_len=torch.tensor(node_len, **i32),
        qo_indptr=torch.tensor(qo, **i32),
        vis_indptr=torch.tensor(vi, **i32),
        vis_nodes=torch.tensor(vis, **i32),
        page_size=page_size,
    )


def from_flashinfer(kv_indptr: Tensor, kv_indices: Tensor, kv_last_page_len: Tensor, page_size: int,
                    qo_indptr: Tensor | None = None) -> ForestMetadata:
    """From FlashInfer's paged layout: request r owns pages ``kv_indices[kv_indptr[r]:kv_indptr[r+1]]``
    with ``kv_last_page_len[r]`` tokens in its last page; ``qo_indptr`` (default one row per request)
    gives its query rows (the last tokens of the request)."""
    _check_page_size(page_size)
    _check_ids("kv_indices", kv_indices)
    for name, t in (("kv_indptr", kv_indptr), ("kv_last_page_len", kv_last_page_len)) + (
            (("qo_indptr", qo_indptr),) if qo_indptr is not None else ()):
        if not isinstance(t, Tensor) or t.dtype not in _INT_DTYPES or t.dim() != 1:
            raise MetadataError(f"{name}: expected a 1-D integer tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    ip = kv_indptr.tolist()
    if not ip or ip[0] != 0 or any(b < a for a, b in zip(ip, ip[1:])):
        raise MetadataError(f"kv_indptr: expected a non-decreasing indptr starting at 0, got {ip}")
    if ip[-1] > kv_indices.numel():
        raise MetadataError(f"kv_indptr: last entry {ip[-1]} is past the end of kv_indices "
                            f"({kv_indices.numel()} entries)")
    R = len(ip) - 1
    last = kv_last_page_len.tolist()
    if len(last) != R:
        raise MetadataError(f"kv_last_page_len: expected {R} entries (len(kv_indptr) - 1), got {len(last)}")
    lists = [kv_indices[ip[r]:ip[r + 1]] for r in range(R)]
    for r, p in enumerate(lists):
        lo = 1 if p.numel() else 0
        if not lo <= last[r] <= (page_size if p.numel() else 0):
            raise MetadataError(f"kv_last_page_len: request {r} has {p.numel()} pages, expected a last-page "
                                f"length in [{lo}, {page_size if p.numel() else 0}], got {last[r]}")
    seq = [max(0, (len(p) - 1) * page_size + last[r]) for r, p in enumerate(lists)]
    q_lens = None
    if qo_indptr is not None:
        qo = qo_indptr.tolist()
        if len(qo) != R + 1 or qo[0] != 0 or any(b < a for a, b in zip(qo, qo[1:])):
            raise MetadataError(f"qo_indptr: expected a non-decreasing indptr of {R + 1} entries starting "
                                f"at 0, got {qo}")
        q_lens = [b - a for a, b in zip(qo, qo[1:])]
    return _from_page_lists(lists, seq, page_size, q_lens, kv_indices.device,
                            names=("kv_indices", "kv_last_page_len", "qo_indptr"))


def from_sglang(token_slots: list[Tensor], q_lens: list[int] | None = None) -> ForestMetadata:
    """From SGLang-style token-slot lists (``req_to_token[r, :seq_len[r]]``, page size 1): request r's
    tokens live at slots ``token_slots[r]`` of a [num_slots, 1, Hk, D] cache view."""
    for r, t in enumerate(token_slots):
        _check_ids(f"token_slots[{r}]", t)
    return _from_page_lists(list(token_slots), [int(t.numel()) for t in token_slots], 1, q_lens,
                            token_slots[0].device if token_slots else None,
                            names=("token_slots", "token_slots", "q_lens"))


def _group_pages(meta: ForestMetadata, g: int) -> tuple[list[int], int]:
    vi = meta.vis_indptr.tolist()
    ip = meta.node_page_indptr.tolist()
    lens = meta.node_len.tolist()
    nodes = meta.vis_nodes.tolist()[vi[g]:vi[g + 1]]
    pages: list[int] = []
    idx = meta.node_page_indices.tolist()
    for n in nodes[:-1]:
        if lens[n] % meta.page_size:
            raise MetadataError(
                f"node_len: node {n} ({lens[n]} tokens) is not page-aligned, so group {g}'s tokens "
                f"are not one contiguous page list")
    for n in nodes:
        npg = -(-lens[n] // meta.page_size)
        pages.extend(idx[ip[n]:ip[n] + npg])
    return pages, sum(lens[n] for n in nodes)


def to_flashinfer(meta: ForestMetadata) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-group FlashInfer layout ``(kv_indptr, kv_indices, kv_last_page_len, qo_indptr)``: each
    group's listed nodes concatenated (every node but the last must be page-aligned)."""
    indptr, indices, last = [0], [], []
    for g in range(meta.num_groups):
        pages, n = _group_pages(meta, g)
        indices.extend(pages)
        indptr.append(len(indices))
        last.append(n - (len(pages) - 1) * meta.page_size if pages else 0)
    i32 = dict(dtype=torch.int32, device=meta.device)
    return (torch.tensor(indptr, **i32), torch.tensor(indices, **i32), torch.tensor(last, **i32),
            meta.qo_indptr.clone())


def to_sglang(meta: ForestMetadata) -> list[Tensor]:
    """Per-group token-slot lists (page size 1 metadata)."""
    if meta.page_size != 1:
        raise MetadataError(f"page_size: expected 1 for token-slot lists, got {meta.page_size}")
    return [torch.tensor(_group_pages(meta, g)[0], dtype=torch.int32, device=meta.device)
            for g in range(meta.num_groups)]
