"""KVForest: structure, page allocation and release, emitted metadata; append_paged_kv reference."""

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.testing import random_forest


def test_fork_join_visibility():
    f = mk.KVForest(32, 4)
    t = f.new_sequence(5)
    a, b, c = f.fork(t, 3)
    d = f.join([a, c])
    assert f.visibility(a) == [t, a]
    assert f.visibility(d) == [t, a, c, d]
    e, = f.fork(d, 1)
    g = f.join([e, b])
    assert f.visibility(g) == [t, a, c, d, e, b, g]
    with pytest.raises(ValueError, match="frozen"):
        f.append(t, 1)


def test_pages_allocated_and_returned():
    f = mk.KVForest(10, 4)
    t = f.new_sequence(9)  # 3 pages
    assert f.num_free_pages == 7
    a, b = f.fork(t, 2)
    f.append(a, 4)  # 1 page
    f.append(b, 5)  # 2 pages
    assert f.num_free_pages == 4
    assert not set(f.node_pages(a)) & set(f.node_pages(t))  # a fork never writes into its parent's pages
    f.free(t)  # children still see the trunk: nothing returns
    assert f.num_free_pages == 4
    f.free(a)
    assert f.num_free_pages == 5
    f.free(b)  # last holder of the trunk goes
    assert f.num_free_pages == 10
    with pytest.raises(ValueError, match="freed"):
        f.append(a, 1)


def test_join_keeps_paths_alive():
    f = mk.KVForest(16, 2)
    t = f.new_sequence(2)
    a, b = f.fork(t, 2)
    f.append(a, 2)
    f.append(b, 2)
    c = f.join([a, b])
    f.append(c, 1)
    for n in (t, a, b):
        f.free(n)
    assert f.num_free_pages == 16 - 4  # t, a, b, c each hold one page, all seen by live c
    f.free(c)
    assert f.num_free_pages == 16


def test_out_of_pages_changes_nothing():
    f = mk.KVForest(2, 4)
    n = f.new_sequence(6)
    with pytest.raises(mk.OutOfPages):
        f.append(n, 5)
    assert f.node_len(n) == 6 and f.num_free_pages == 0


def test_append_positions_and_page_table():
    f = mk.KVForest(8, 4, page_order=[5, 2, 7, 0, 1, 3, 4, 6])
    n = f.new_sequence(3)
    node, pos = f.append(n, 3)
    assert node.tolist() == [n] * 3 and pos.tolist() == [3, 4, 5]
    ip, idx = f.page_table()
    assert ip.tolist() == [0, 2] and idx.tolist() == [5, 2]
    assert ip.dtype == idx.dtype == torch.int32


def test_metadata_validates_for_random_forests():
    for seed in range(30):
        f, groups = random_forest(seed, page_size=[1, 3, 16][seed % 3])
        m = f.metadata(groups)
        m.validate(f.num_pages)
        assert m.num_groups == len(groups)
        assert m.q_lens().tolist() == [q for _, q in groups]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_append_paged_kv_reference_roundtrip(page_size):
    """Tokens written through append_paged_kv are read back at the slots the metadata names."""
    f = mk.KVForest(64, page_size, page_order=list(torch.randperm(64).tolist()))
    t = f.new_sequence()
    tok = [f.append(t, 7)]
    a, b = f.fork(t, 2)
    tok += [f.append(a, 5), f.append(b, 1), f.append(a, 2)]
    node = torch.cat([x[0] for x in tok])
    pos = torch.cat([x[1] for x in tok])
    kc = torch.full((64, page_size, 2, 8), float("nan"))
    vc = kc.clone()
    k = torch.randn(node.numel(), 2, 8)
    v = torch.randn(node.numel(), 2, 8)
    mk.append_paged_kv(k, v, kc, vc, *f.page_table(), node, pos)
    m = f.metadata([(a, 1), (b, 1)])
    for n, expect in ((t, slice(0, 7)), (b, slice(12, 13))):
        slots = m.node_token_slots(n)
        torch.testing.assert_close(kc.view(-1, 2, 8)[slots], k[expect])
        torch.testing.assert_close(vc.view(-1, 2, 8)[slots], v[expect])
    a_rows = torch.cat([torch.arange(7, 12), torch.arange(13, 15)])
    torch.testing.assert_close(kc.view(-1, 2, 8)[m.node_token_slots(a)], k[a_rows])
    assert int(torch.isnan(kc).logical_not().all(-1).all(-1).sum()) == node.numel()  # nothing else written
