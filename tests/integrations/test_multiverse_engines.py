"""How an engine drives a Multiverse generation (docs/integration.md): an SGLang-style token pool
(page size 1, one request per path) and a FlashInfer-style page table (per-request pages, the trunk's
partial last page copied per path) turned into forests with the converters; the attention equals
per-request attention and the shared prefix is one node, read once."""

import pytest
import torch
import torch.nn.functional as F

import multiverse_kernels as mk
from multiverse_kernels.integrations.transformers import kv_elements_read
from multiverse_kernels.multiverse import MultiverseTags, parse

V = 32
TAGS = MultiverseTags(*range(V, V + 10))
P, PE, G, GE, OS, OE, PA, PAE, C, CE = TAGS.ids()
HQ, HK, D = 4, 2, 64


def per_request_attention(q, k_flat, v_flat, slot_lists):
    """Row r (the last token of request r) over its own slots, plain SDPA: what a per-request kernel does."""
    out = []
    for r, slots in enumerate(slot_lists):
        k = k_flat[slots.long()].transpose(0, 1)  # [Hk, n, D]
        v = v_flat[slots.long()].transpose(0, 1)
        o = F.scaled_dot_product_attention(q[r:r + 1].transpose(0, 1), k, v, enable_gqa=True)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def test_sglang_token_pool():
    # The engine's view: a token pool [num_slots, Hk, D] and req_to_token rows. The trunk (prompt up to
    # </Goal>) is in the radix cache; every path is a request whose row starts with the trunk's slots.
    trunk = [1, 2, 3, P, G, OS, 4, OE, OS, 5, OE, OS, 6, OE, GE]
    gen = torch.Generator().manual_seed(0)
    pool_k = torch.randn(256, HK, D, generator=gen, dtype=torch.float64)
    pool_v = torch.randn(256, HK, D, generator=gen, dtype=torch.float64)
    free = torch.randperm(256, generator=gen).tolist()
    trunk_slots = [free.pop() for _ in trunk]
    path_len = [5, 3, 7]
    path_slots = [[free.pop() for _ in range(n)] for n in path_len]
    # decode step: each path request's row = trunk slots + its own slots (its last token is the query)
    rows = [torch.tensor(trunk_slots + ps, dtype=torch.int32) for ps in path_slots]
    meta = mk.from_sglang(rows)  # finds the shared trunk: one node read once for all three paths
    assert meta.num_nodes == 4 and kv_elements_read(meta, per_group=False) == len(trunk) + sum(path_len)
    q = torch.randn(3, HQ, D, generator=gen, dtype=torch.float64)
    k_cache, v_cache = pool_k.view(256, 1, HK, D), pool_v.view(256, 1, HK, D)  # page size 1 view
    out = mk.tree_attention(q, k_cache, v_cache, meta, backend="reference")
    torch.testing.assert_close(out, per_request_attention(q, pool_k, pool_v, rows))
    # the join: Multiverse's engine builds the conclusion request by concatenating the paths' slot lists
    concl_slots = [free.pop() for _ in range(2)]
    concl_row = torch.tensor(trunk_slots + sum(path_slots, []) + concl_slots, dtype=torch.int32)
    meta = mk.from_sglang([concl_row], q_lens=[2])  # extend by 2 tokens
    qc = torch.randn(2, HQ, D, generator=gen, dtype=torch.float64)
    out = mk.tree_attention(qc, k_cache, v_cache, meta, backend="reference")
    # rows see everything before them in the concatenated list (causal within the conclusion)
    n = concl_row.numel()
    kk = pool_k[concl_row.long()].transpose(0, 1)
    vv = pool_v[concl_row.long()].transpose(0, 1)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, -1] = False
    ref = F.scaled_dot_product_attention(qc.transpose(0, 1), kk, vv, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(0, 1))
    # positions: the engine keeps them per request with parse() of the flat sequence (or the driver)
    flat = trunk + [PA, 7, 8, 9, PAE] + [PA, 7, PAE] + [PA, 1, 2, 3, 4, 5, PAE] + [C, 9]
    pos = parse(flat, TAGS, partial=True).position_ids
    assert pos[len(trunk)] == len(trunk) and pos[-2] == len(trunk) - 1 + 7 + 1


@pytest.mark.parametrize("page_size", [4, 16])
def test_flashinfer_page_table(page_size):
    # A FlashInfer-style engine: per-request page lists, last page partially filled. Forking at </Goal>
    # mid-page copies the trunk's partial last page into each path's first page (copy-on-write).
    gen = torch.Generator().manual_seed(page_size)
    num_pages = 64
    k_cache = torch.randn(num_pages, page_size, HK, D, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(num_pages, page_size, HK, D, generator=gen, dtype=torch.float64)
    trunk_len = 2 * page_size + 3
    trunk_pages = [0, 1, 2]  # the last one holds 3 tokens
    lists, seq_lens, slot_lists = [], [], []
    nxt = 3
    for plen in [5, page_size + 1, 2]:
        own = [nxt + j for j in range(-(-(3 + plen) // page_size))]
        nxt += len(own)
        k_cache[own[0], :3] = k_cache[2, :3]  # the copied partial page
        v_cache[own[0], :3] = v_cache[2, :3]
        pages = trunk_pages[:2] + own
        lists.append(torch.tensor(pages, dtype=torch.int32))
        seq_lens.append(trunk_len + plen)
        slot_lists.append(torch.tensor([pages[t // page_size] * page_size + t % page_size
                                        for t in range(trunk_len + plen)], dtype=torch.int32))
    kv_indptr = torch.tensor([0] + torch.cumsum(torch.tensor([len(x) for x in lists]), 0).tolist(),
                             dtype=torch.int32)
    kv_indices = torch.cat(lists)
    last = torch.tensor([n - (len(x) - 1) * page_size for n, x in zip(seq_lens, lists)], dtype=torch.int32)
    meta = mk.from_flashinfer(kv_indptr, kv_indices, last, page_size)
    meta.validate(num_pages=num_pages)
    # the two full trunk pages are one shared node; the copied partial page is per path
    assert kv_elements_read(meta, per_group=False) == 2 * page_size + sum(n - 2 * page_size for n in seq_lens)
    q = torch.randn(3, HQ, D, generator=gen, dtype=torch.float64)
    out = mk.tree_attention(q, k_cache, v_cache, meta, backend="reference")
    kf, vf = k_cache.view(-1, HK, D), v_cache.view(-1, HK, D)
    torch.testing.assert_close(out, per_request_attention(q, kf, vf, slot_lists))
