"""Every validation error class: bad input gets a clear error naming the argument."""

from dataclasses import replace

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels import MetadataError
from multiverse_kernels.testing import design_example_forest, make_inputs

i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)


@pytest.fixture
def example():
    f, groups = design_example_forest()
    m = f.metadata(groups)
    q, k, v = make_inputs(m, 16)
    return m, q, k, v


def _raises(match, m, q, k, v, **kw):
    with pytest.raises(MetadataError, match=match):
        mk.tree_attention(q, k, v, m, **kw)


def test_valid_passes(example):
    m, q, k, v = example
    m.validate(16)
    mk.tree_attention(q, k, v, m)


def test_index_dtype(example):
    m, q, k, v = example
    _raises("vis_nodes: expected dtype torch.int32", replace(m, vis_nodes=m.vis_nodes.long()), q, k, v)


def test_page_index_out_of_range(example):
    m, q, k, v = example
    bad = m.node_page_indices.clone()
    bad[2] = 16
    _raises(r"node_page_indices: expected page ids in \[0, 16\)", replace(m, node_page_indices=bad),
            q, k, v)
    bad[2] = -1
    _raises("node_page_indices", replace(m, node_page_indices=bad), q, k, v)


def test_node_id_out_of_range(example):
    m, q, k, v = example
    _raises("vis_nodes: expected node ids", replace(m, vis_nodes=i32([0, 1, 0, 2, 0, 1, 2, 9])), q, k, v)


def test_empty_visibility_list_with_rows(example):
    m, q, k, v = example
    m2 = replace(m, vis_indptr=i32([0, 2, 2, 6]), vis_nodes=i32([0, 1, 0, 1, 2, 3]))
    _raises("group 1 has 1 query rows but an empty visibility list", m2, q, k, v)


def test_repeating_visibility_list(example):
    m, q, k, v = example
    m2 = replace(m, vis_nodes=i32([0, 1, 0, 2, 0, 1, 0, 3]))
    _raises("group 2 lists node 0 more than once", m2, q, k, v)


def test_q_len_larger_than_own_node(example):
    m, q, k, v = example
    m2 = replace(m, qo_indptr=i32([0, 1, 2, 5]))
    q2 = torch.randn(5, *q.shape[1:])
    _raises(r"group 2 has q_len 3 but its own \(last-listed\) node 3 has only 2 tokens", m2, q2, k, v)


def test_too_few_pages_for_length(example):
    m, q, k, v = example
    _raises("node 0 has 3 pages but node_len", replace(m, node_len=i32([13, 5, 3, 2])), q, k, v)


def test_indptr_shape_and_monotonic(example):
    m, q, k, v = example
    _raises("node_page_indptr: expected length", replace(m, node_page_indptr=i32([0, 3, 5, 7])), q, k, v)
    _raises("non-decreasing", replace(m, node_page_indptr=i32([0, 3, 2, 6, 7])), q, k, v)
    _raises(r"vis_indptr: expected vis_indptr\[-1\]", replace(m, vis_indptr=i32([0, 2, 4, 7])), q, k, v)
    _raises("negative", replace(m, node_len=i32([10, -1, 3, 2])), q, k, v)


def test_q_rows_mismatch(example):
    m, q, k, v = example
    _raises(r"q: expected 4 rows \(qo_indptr\[-1\]\)", m, q[:3], k, v)


def test_tensor_args(example):
    m, q, k, v = example
    _raises("q: expected dtype", m, q.int(), k, v)
    _raises("k_cache: expected dtype", m, q, k.half(), v)
    _raises("k_cache: expected a 4-D tensor", m, q, k[0], v)
    _raises("v_cache: expected the shape of k_cache", m, q, k, v[:, :, :1])
    _raises("k_cache: expected head_dim 64", m, q, k[..., :32], v[..., :32])
    _raises("num_kv_heads dividing num_qo_heads", m, q[:, :3], k, v)
    _raises("meta.page_size", replace(m, page_size=8), q, k, v)


def test_own_full_shape(example):
    m, q, k, v = example
    _raises("own_full: expected a bool tensor of shape", replace(m, own_full=torch.ones(2, dtype=torch.bool)),
            q, k, v)


def test_validation_can_be_switched_off(example):
    m, q, k, v = example
    # A repeated node is not caught without validation (the hot path trusts its producer).
    m2 = replace(m, vis_nodes=i32([0, 1, 0, 2, 0, 1, 0, 3]))
    mk.tree_attention(q, k, v, m2, validate=False, backend="reference")


def test_unknown_backend(example):
    m, q, k, v = example
    with pytest.raises(ValueError, match="backend: expected one of"):
        mk.tree_attention(q, k, v, m, backend="tpu")


def test_merge_states_args():
    with pytest.raises(MetadataError, match="s: expected shape"):
        mk.merge_states(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5))
    with pytest.raises(MetadataError, match="s: expected dtype"):
        mk.merge_states(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4).half())
    with pytest.raises(MetadataError, match="v: expected a 4-D tensor"):
        mk.merge_states(torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_append_args():
    f = mk.KVForest(4, 4)
    n = f.new_sequence(3)
    node, pos = f.append(n, 2)  # positions 3, 4 -> needs 2 pages
    ip, idx = f.page_table()
    kc = torch.zeros(4, 4, 2, 8)
    vc = torch.zeros_like(kc)
    k = torch.randn(2, 2, 8)
    mk.append_paged_kv(k, k, kc, vc, ip, idx, node, pos)
    with pytest.raises(MetadataError, match="token_pos: token 0 writes position 8 of node 0"):
        mk.append_paged_kv(k, k, kc, vc, ip, idx, node, pos + 5)
    with pytest.raises(MetadataError, match="token_node: expected node ids"):
        mk.append_paged_kv(k, k, kc, vc, ip, idx, node + 1, pos)
    with pytest.raises(MetadataError, match="token_node/token_pos: expected 2 entries"):
        mk.append_paged_kv(k, k, kc, vc, ip, idx, node[:1], pos[:1])
    with pytest.raises(MetadataError, match="k: expected"):
        mk.append_paged_kv(k[:, :1], k[:, :1], kc, vc, ip, idx, node, pos)
    with pytest.raises(MetadataError, match="page_indices: expected page ids"):
        mk.append_paged_kv(k, k, kc[:1], vc[:1], ip, idx, node, pos)
