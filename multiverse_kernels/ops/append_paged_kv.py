"""``append_paged_kv``: write new tokens' K/V into their nodes' pages (in place)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import resolve
from ..metadata import MetadataError, _check_indptr
from ..plan_cache import check_once
from ._checks import FLOAT_DTYPES, check_tensor, debug_checks, fake_checks
from ._dispatch import check_flag, direct_call_ok

__all__ = ["append_paged_kv"]


def _cheap_checks(k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos) -> None:
    """No-sync checks run whatever ``validate`` says: every tensor on k's device (a ``meta`` tensor
    would otherwise dispatch to the fake implementation and write nothing), index tensors int32."""
    check_tensor("k", k, dim=3, dtypes=FLOAT_DTYPES)
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, device=k.device)
    for name, t in (("page_indptr", page_indptr), ("page_indices", page_indices),
                    ("token_node", token_node), ("token_pos", token_pos)):
        check_tensor(name, t, dim=1, dtypes=(torch.int32,), device=k.device)


def _validate(k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos) -> None:
    check_tensor("k", k, dim=3, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, dim=3, dtypes=(k.dtype,), device=k.device)
    check_tensor("k_cache", k_cache, dim=4, dtypes=FLOAT_DTYPES, device=k.device)
    check_tensor("v_cache", v_cache, dim=4, dtypes=(k_cache.dtype,), device=k.device)
    if k.shape != v.shape:
        raise MetadataError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape:
        raise MetadataError(
            f"v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]):
        raise MetadataError(
            f"k: expected [n, {k_cache.shape[2]}, {k_cache.shape[3]}] to match k_cache's heads and "
            f"head_dim, got {tuple(k.shape)}"
        )
    for name, t in (("page_indptr", page_indptr), ("page_indices", page_indices),
                    ("token_node", token_node), ("token_pos", token_pos)):
        check_tensor(name, t, dim=1, dtypes=(torch.int32,), device=k.device)
    n = k.shape[0]
    if token_node.numel() != n or token_pos.numel() != n:
        raise MetadataError(
            f"token_node/token_pos: expected {n} entries (one per row of k), got "
            f"{token_node.numel()} and {token_pos.numel()}"
        )
    # the index tensors' data (host syncs): once per step's tensors (plan_cache.check_once)
    check_once(("append", k_cache.shape[0], k_cache.shape[1]),
               (page_indptr, page_indices, token_node, token_pos),
               lambda: _validate_data(k_cache, page_indptr, page_indices, token_node, token_pos))


def _validate_data(k_cache, page_indptr, page_indices, token_node, token_pos) -> None:
    n = token_node.numel()
    # the page table itself: an indptr over page_indices (its last entry == len(page_indices))
    _check_indptr("page_indptr", page_indptr, page_indices.numel(), "page_indices")
    if page_indices.numel():
        lo, hi = int(page_indices.min()), int(page_indices.max())
        if lo < 0 or hi >= k_cache.shape[0]:
            raise MetadataError(
                f"page_indices: expected page ids in [0, {k_cache.shape[0]}), found {lo if lo < 0 else hi}")
    if n == 0:
        return
    num_nodes = page_indptr.numel() - 1
    if int(token_node.min()) < 0 or int(token_node.max()) >= num_nodes:
        raise MetadataError(
            f"token_node: expected node ids in [0, {num_nodes}) (len(page_indptr) - 1), found "
            f"{int(token_node.min()) if int(token_node.min()) < 0 else int(token_node.max())}")
    if int(token_pos.min()) < 0:
        raise MetadataError(f"token_pos: expected non-negative positions, found {int(token_pos.min())}")
    ps = k_cache.shape[1]
    cap = (page_indptr[1:] - page_indptr[:-1]).long()[token_node.long()] * ps
    over = (token_pos.long() >= cap).nonzero()
    if over.numel():
        i = int(over[0])
        raise MetadataError(
            f"token_pos: token {i} writes position {int(token_pos[i])} of node {int(token_node[i])}, "
            f"which has pages for only {int(cap[i])} tokens"
        )


def _append_paged_kv_impl(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, page_indptr: Tensor,
                        page_indices: Tensor, token_node: Tensor, token_pos: Tensor, backend: str,
                        validate: bool) -> None:
    _cheap_checks(k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos)
    if validate or debug_checks():
        _validate(k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos)
    resolve("append_paged_kv", backend, k.device)(k, v, k_cache, v_cache, page_indptr, page_indices,
                                                   token_node, token_pos)


# The op runs _append_paged_kv_impl; the public wrapper calls the function itself where the dispatcher
# would add nothing but the caches' version bump, which it then does itself (ops/_dispatch.py).
_append_paged_kv_op = torch.library.custom_op("multiverse::append_paged_kv",
                                              mutates_args=("k_cache", "v_cache"))(_append_paged_kv_impl)


@_append_paged_kv_op.register_fake
def _(k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos, backend, validate):
    # under torch.compile the real op raises at run time
    fake_checks(_cheap_checks, k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos)
    return None


def append_paged_kv(
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    page_indptr: Tensor,
    page_indices: Tensor,
    token_node: Tensor,
    token_pos: Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> None:
    """Write ``k[i], v[i]`` as token ``token_pos[i]`` of node ``token_node[i]``.

    Args:
        k, v: [n, num_kv_heads, head_dim] new tokens (cast to the cache dtype).
        k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim], written in place.
        page_indptr, page_indices: int32 node page table (``node_page_indptr``/``node_page_indices``
            of a :class:`ForestMetadata`, or :meth:`KVForest.page_table`).
        token_node, token_pos: int32 [n] node id and position within that node of each new token.
    """
    check_flag("validate", validate)
    if not direct_call_ok(k, v, k_cache, v_cache):
        _append_paged_kv_op(k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos,
                            backend, validate)
        return
    _append_paged_kv_impl(k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos, backend,
                          validate)
    for cache in (k_cache, v_cache):  # as the op's in-place registration does (not for inference tensors)
        if not cache.is_inference():
            torch.autograd.graph.increment_version(cache)
