"""Converters from engine formats find the shared prefix and round-trip."""

import random

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.testing import make_inputs

i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)


def _tree_requests(seed, page_size, n_req=6):
    """Requests that share page-aligned prefixes the way an engine's prefix cache shares them."""
    rng = random.Random(seed)
    nxt = iter(rng.sample(range(1000), 1000))
    prefix = [next(nxt) for _ in range(rng.randint(1, 4))]
    lists, lens = [], []
    for _ in range(n_req):
        cut = rng.randint(0, len(prefix))
        mid = [next(nxt) for _ in range(rng.randint(0, 2))]
        tail = [next(nxt) for _ in range(rng.randint(1, 3))]
        pages = prefix[:cut] + mid + tail
        if rng.random() < 0.3:
            prefix = prefix[:cut] + mid  # later requests may branch off this one's pages too
        lists.append(pages)
        lens.append((len(pages) - 1) * page_size + rng.randint(1, page_size))
    return lists, lens


@pytest.mark.parametrize("seed", range(10))
def test_flashinfer_roundtrip_and_sharing(seed):
    ps = 4
    lists, lens = _tree_requests(seed, ps)
    indptr = i32([0] + list(torch.tensor([len(p) for p in lists]).cumsum(0)))
    indices = i32([p for ps_ in lists for p in ps_])
    last = i32([n - (len(p) - 1) * ps for n, p in zip(lens, lists)])
    m = mk.from_flashinfer(indptr, indices, last, ps)
    m.validate(num_pages=1000)
    # every page appears in exactly one node
    assert m.node_page_indices.unique().numel() == m.node_page_indices.numel()
    assert set(m.node_page_indices.tolist()) == set(indices.tolist())
    ip2, idx2, last2, qo2 = mk.to_flashinfer(m)
    assert torch.equal(ip2, indptr) and torch.equal(idx2, indices) and torch.equal(last2, last)
    assert qo2.tolist() == list(range(len(lists) + 1))


def test_flashinfer_attention_equals_per_request():
    ps = 4
    # two requests sharing 2 full pages, then diverging; an extend request of 3 rows
    lists = [[0, 1, 2], [0, 1, 3, 4], [5]]
    lens = [9, 14, 3]
    indptr = i32([0, 3, 7, 8])
    indices = i32([0, 1, 2, 0, 1, 3, 4, 5])
    last = i32([1, 2, 3])
    m = mk.from_flashinfer(indptr, indices, last, ps, qo_indptr=i32([0, 1, 2, 5]))
    assert m.num_nodes == 4 and m.node_len.tolist()[0] == 8  # the shared two pages became one node
    q, k, v = make_inputs(m, 8, dtype=torch.float64)
    out = mk.tree_attention(q, k, v, m)
    # per request: plain causal attention over its own page list
    for r, (pages, n) in enumerate(zip(lists, lens)):
        rows = m.qo_indptr[r].item(), m.qo_indptr[r + 1].item()
        slots = torch.tensor([p * ps + j for p in pages for j in range(ps)])[:n]
        kk = k.view(-1, 2, 64)[slots].repeat_interleave(2, 1)
        vv = v.view(-1, 2, 64)[slots].repeat_interleave(2, 1)
        qq = q[rows[0]:rows[1]]
        s = torch.einsum("qhd,khd->hqk", qq, kk) * 64 ** -0.5
        ql = rows[1] - rows[0]
        causal = torch.arange(n)[None] <= (n - ql + torch.arange(ql))[:, None]
        o = torch.einsum("hqk,khd->qhd", s.masked_fill(~causal, float("-inf")).softmax(-1), vv)
        torch.testing.assert_close(out[rows[0]:rows[1]], o)


@pytest.mark.parametrize("seed", range(5))
def test_sglang_roundtrip(seed):
    rng = random.Random(seed)
    prompt = rng.sample(range(500, 600), 20)
    reqs = []
    for _ in range(5):
        cut = rng.randint(1, 20)
        reqs.append(i32(prompt[:cut] + rng.sample(range(1000, 2000), rng.randint(1, 6))))
    m = mk.from_sglang(reqs)
    m.validate(num_pages=2000)
    assert m.page_size == 1
    assert int(m.node_len.sum()) == len(set(torch.cat(reqs).tolist()))  # each slot in exactly one node
    back = mk.to_sglang(m)
    for a, b in zip(back, reqs):
        assert torch.equal(a, b)


def test_converter_errors():
    with pytest.raises(mk.MetadataError, match="q_lens"):
        mk.from_sglang([i32([1, 2, 3]), i32([1, 2, 3, 4])], q_lens=[1, 2])  # row 2 of req 1 is shared
    with pytest.raises(mk.MetadataError, match="seq_lens"):
        mk.from_page_lists([i32([0, 1])], [9], 4)
    m = mk.from_page_lists([i32([0, 1]), i32([0, 2])], [5, 6], 4)
    with pytest.raises(mk.MetadataError, match="page_size: expected 1"):
        mk.to_sglang(m)
