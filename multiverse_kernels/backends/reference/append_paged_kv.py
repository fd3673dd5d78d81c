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
    """k, v [n, Hk, D] -> k_cache, v_cache [num_pages, page_size, Hk, D] in place."""
    ps = k_cache.shape[1]
    slots = token_slots(page_indptr, page_indices, token_node, token_pos, ps)
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v.to(v_cache.dtype)
