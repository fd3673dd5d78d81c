"""Triton merge_states and append_paged_kv in the Triton interpreter against the reference.

See tests/_triton_interp.py for what the interpreter covers (bf16 math is not checked numerically;
the merge converts loaded values to fp32 on every target, so its bf16 path is covered).
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import triton_interpreter  # noqa: F401  (module fixture)

import multiverse_kernels as mk
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.testing import tolerance

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_states,d", [(1, 64), (3, 128), (5, 256), (0, 64)])
def test_merge_states(dtype, num_states, d):
    g = torch.Generator().manual_seed(num_states * 7 + d)
    n, h = 6, 3
    v = torch.randn(n, num_states, h, d, generator=g).to(dtype)
    s = torch.randn(n, num_states, h, generator=g) * 4
    if num_states > 1:
        s[0] = float("-inf")  # a row with only empty states
        s[1, 0] = float("-inf")  # one empty state among others
    out, lse = mk.merge_states(v, s, backend="triton")
    if num_states == 0:  # nothing to merge: out 0, lse -inf (the reference cannot reduce 0 states)
        assert (lse == float("-inf")).all() and (out == 0).all()
        return
    ref_out, ref_lse = mk.merge_states(v, s, backend="reference")
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, **tolerance(dtype))
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    if num_states > 1:
        assert (lse[0] == float("-inf")).all() and (out[0] == 0).all()


def test_merge_states_bad_input():
    v = torch.zeros(2, 2, 1, 64, dtype=torch.float64)
    with pytest.raises(MetadataError, match="v: backend 'triton'"):
        mk.merge_states(v, torch.zeros(2, 2, 1, dtype=torch.float64), backend="triton")


@pytest.mark.parametrize("page_size,hk,d,dtype", [
    (1, 1, 64, torch.float32), (4, 2, 128, torch.float16), (16, 3, 256, torch.bfloat16),
    (128, 8, 64, torch.float16),
])
def test_append_paged_kv(page_size, hk, d, dtype):
    order = torch.randperm(24, generator=torch.Generator().manual_seed(page_size)).tolist()
    f = mk.KVForest(24, page_size, page_order=order)
    root = f.new_sequence(5)
    leaves = f.fork(root, 3)
    nodes, pos = [], []
    for i, leaf in enumerate(leaves):
        nd, ps = f.append(leaf, [1, 3, page_size + 1][i])  # crosses a page boundary
        nodes.append(nd)
        pos.append(ps)
    node, pos = torch.cat(nodes), torch.cat(pos)
    g = torch.Generator().manual_seed(d)
    k = torch.randn(node.numel(), hk, d, generator=g)  # float32 source, cast to the cache dtype
    v = torch.randn(node.numel(), hk, d, generator=g)
    shape = (f.num_pages, page_size, hk, d)
    kc = torch.full(shape, float("nan"), dtype=dtype)
    vc = torch.full(shape, float("nan"), dtype=dtype)
    kr, vr = kc.clone(), vc.clone()
    pi, pidx = f.page_table()
    mk.append_paged_kv(k, v, kc, vc, pi, pidx, node, pos, backend="triton")
    mk.append_paged_kv(k, v, kr, vr, pi, pidx, node, pos, backend="reference")
    # fp32 -> bf16: the interpreter's cast may differ from round-to-nearest-even by one bf16 ulp
    tol = dict(atol=0, rtol=0) if dtype != torch.bfloat16 else dict(atol=0, rtol=2 ** -7)
    torch.testing.assert_close(kc, kr, equal_nan=True, **tol)
    torch.testing.assert_close(vc, vr, equal_nan=True, **tol)
    assert (~torch.isnan(kc)).sum() == node.numel() * hk * d, "wrote exactly the new tokens"
