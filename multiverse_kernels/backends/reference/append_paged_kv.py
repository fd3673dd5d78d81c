"""Reference append: write new tokens' K/V into their nodes' pages."""

from __future__ import annotations

from torch import Tensor


def token_slots(page_indptr: Tensor, page_indices: Tensor, token_node: Tensor, token_pos: Tensor,
                page_size: int) -> Tensor:
    """int64 [n]: flat cache slot of token ``token_pos[i]`` of node ``token_node[i]``."""
    page = page_indices.long()[page_indptr.long()[token_node.long()] + token_pos.long() // page_size]
    return page * page_size + token_pos.long() % page_size


def append_paged_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, page_indptr: Tensor,
                    page_indices: Tensor, token_node: Tensor, token_pos: Tensor) -> None:
    """k, v [n, Hk, D] -> k_cache, v_cache [num_pages, page_size, Hk, D] in place (any strides: indexed
    by page and slot, so a head-major cache's transposed view is written too)."""
    ps = k_cache.shape[1]
    slots = token_slots(page_indptr, page_indices, token_node, token_pos, ps)
    page, slot = slots // ps, slots % ps
    k_cache[page, slot] = k.to(k_cache.dtype)
    v_cache[page, slot] = v.to(v_cache.dtype)
