"""The reference tree attention against dense-mask SDPA, in float64, on random and real-shaped forests."""

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.testing import (
    beam_forest,
    design_example_forest,
    eagle_tree_forest,
    make_inputs,
    multiverse_forest,
    random_forest,
    sampling_forest,
)


def _check(meta, num_pages, hq=4, hk=2, d=64, seed=0, own_full=None):
    if own_full is not None:
        meta = meta.with_own_full(own_full)
    q, k, v = make_inputs(meta, num_pages, hq, hk, d, torch.float64, seed=seed)
    out, lse = mk.tree_attention(q, k, v, meta, return_lse=True, backend="reference")
    ref_out, ref_lse = mk.dense_attention(q, k, v, meta, return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6)  # lse is float32
    assert not torch.isnan(out).any()
    return out, lse


@pytest.mark.parametrize("seed", range(24))
def test_random_forests(seed):
    page_size = [1, 4, 16][seed % 3]
    hq, hk = [(4, 4), (4, 2), (8, 1), (8, 2)][seed % 4]
    f, groups = random_forest(seed, page_size=page_size)
    _check(f.metadata(groups), f.num_pages, hq, hk, d=[64, 128, 256][seed % 3], seed=seed)


@pytest.mark.parametrize("seed", range(6))
def test_random_forests_own_full(seed):
    f, groups = random_forest(100 + seed, page_size=4)
    _check(f.metadata(groups), f.num_pages, own_full=True, seed=seed)


@pytest.mark.parametrize("shape", [multiverse_forest, sampling_forest, beam_forest, eagle_tree_forest])
def test_real_shapes(shape):
    f, groups = shape()
    _check(f.metadata(groups), f.num_pages, 8, 2, 128)


def test_worked_example_from_design():
    """docs/design.md §2: 10-token trunk, paths A (5) and B (3), conclusion C (2) joining them, page 4."""
    f, groups = design_example_forest()
    m = f.metadata(groups)
    assert m.node_page_indptr.tolist() == [0, 3, 5, 6, 7]
    assert m.node_page_indices.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert m.node_len.tolist() == [10, 5, 3, 2]
    assert m.qo_indptr.tolist() == [0, 1, 2, 4]
    assert m.vis_indptr.tolist() == [0, 2, 4, 8]
    assert m.vis_nodes.tolist() == [0, 1, 0, 2, 0, 1, 2, 3]
    mask = mk.dense_mask(m)  # keys: trunk 0-9, A 10-14, B 15-17, C 18-19
    assert mask[0].nonzero().flatten().tolist() == list(range(15))
    assert mask[1].nonzero().flatten().tolist() == list(range(10)) + [15, 16, 17]
    assert mask[2].nonzero().flatten().tolist() == list(range(19))
    assert mask[3].nonzero().flatten().tolist() == list(range(20))
    _check(m, f.num_pages)


def test_row_that_sees_nothing_is_zero_not_nan():
    """A group whose rows see only empty nodes cannot exist (q_len <= own len), but a row's own node may
    be the only non-empty one; here we force an empty visible set through an own_full empty group."""
    m = mk.ForestMetadata(
        node_page_indptr=torch.tensor([0, 1], dtype=torch.int32),
        node_page_indices=torch.tensor([0], dtype=torch.int32),
        node_len=torch.tensor([0], dtype=torch.int32),
        qo_indptr=torch.tensor([0, 0], dtype=torch.int32),
        vis_indptr=torch.tensor([0, 1], dtype=torch.int32),
        vis_nodes=torch.tensor([0], dtype=torch.int32),
        page_size=4,
    )
    q, k, v = make_inputs(m, 1, dtype=torch.float64)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)
    # Merging only empty states is the way an empty row arises inside kernels:
    o, s = mk.merge_states(torch.randn(3, 2, 4, 8), torch.full((3, 2, 4), float("-inf")))
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(s).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    f, groups = multiverse_forest(prefix=40, paths=3, path_len=9, page_size=16)
    m = f.metadata(groups)
    q, k, v = make_inputs(m, f.num_pages, 4, 2, 64, dtype)
    out = mk.tree_attention(q, k, v, m, backend="reference")
    ref = mk.tree_attention(q.double(), k.double(), v.double(), m, backend="reference")
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_sm_scale_is_used():
    f, groups = sampling_forest(prompt=20, samples=3, gen_len=2, page_size=4)
    m = f.metadata(groups)
    q, k, v = make_inputs(m, f.num_pages, dtype=torch.float64)
    a, la = mk.tree_attention(q, k, v, m, sm_scale=0.3, return_lse=True)
    b, lb = mk.dense_attention(q, k, v, m, sm_scale=0.3, return_lse=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(la, lb)
    c = mk.tree_attention(q, k, v, m)
    assert not torch.allclose(a, c)
