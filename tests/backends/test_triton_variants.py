"""Triton attention variants in the interpreter, where the generic tests (tests/ops/test_variants.py) are
thin: sliding windows that cut *inside* a node for some readers of one work item and not others (a
shared prompt read by samples at different positions, multi-row extends whose rows each start their
window elsewhere, a join with KVForest positions), soft-caps that saturate, and fp8 caches with
NaN / large values. Forward and backward against the reference (fp32; bf16 forward), outputs poisoned.

See tests/_triton_interp.py for what the interpreter covers (bf16 math runs in fp32 on CPU).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from _triton_interp import triton_interpreter  # noqa: F401  (module fixture)

import multiverse_kernels as mk
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.planning import plan_tree_attention
from multiverse_kernels.testing import compact_pages, make_inputs, tolerance
from multiverse_kernels.variants import Variant

_ta = importlib.import_module("multiverse_kernels.backends.triton.tree_attention")
_bw = torch.ops.multiverse.tree_attention_backward


def _forest(kind: str, page_size: int):
    """(meta, num_pages): forests whose readers of one node sit at different positions."""
    f = mk.KVForest(256, page_size)
    root = f.new_sequence(37)
    if kind == "samples":  # one prompt, samples of different lengths: each has its own window start
        a, b, c, d = f.fork(root, 4)
        for n, length in ((a, 5), (b, 19), (c, 2), (d, 40)):
            f.append(n, length)
        groups = [(a, 1), (b, 3), (c, 2), (d, 1)]
    elif kind == "extend":  # a long prefill-like extend (many rows, causal, windows sliding over it)
        (a,) = f.fork(root, 1)
        f.append(a, 45)
        groups = [(a, 45), (root, 0)]
    else:  # "join": Multiverse-style branches joined by a conclusion (KVForest positions)
        a, b = f.fork(root, 2)
        f.append(a, 13)
        f.append(b, 4)
        c = f.join([a, b])
        f.append(c, 6)
        groups = [(a, 2), (b, 1), (c, 6)]
    return compact_pages(f.metadata(groups))


def _inputs(kind, page_size, dtype, seed=0, scale=1.0):
    meta, num_pages = _forest(kind, page_size)
    q, k, v = make_inputs(meta, num_pages, 8, 2, 64, torch.float32, seed=seed)
    return meta, (q * scale).to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("kind", ["samples", "extend", "join"])
@pytest.mark.parametrize("window", [1, 4, 23, 1000])
def test_window_forward(kind, window):
    """Windows of 1 (the row itself), ones cutting inside nodes at every row's own place, and one larger
    than the forest (plain attention), with the GQA rows packed (8 query heads on 2 KV heads)."""
    meta, q, k, v = _inputs(kind, 4, torch.float32, seed=window)
    want, wl = mk.tree_attention(q, k, v, meta, backend="reference", window=window, return_lse=True)
    got, gl = mk.tree_attention(q, k, v, meta, backend="triton", window=window, return_lse=True)
    torch.testing.assert_close(got, want, **tolerance(torch.float32))
    torch.testing.assert_close(gl, wl, **tolerance(torch.float32))
    if window == 1000:
        torch.testing.assert_close(got, mk.tree_attention(q, k, v, meta, backend="triton"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_softcap_forward_half(dtype):
    meta, q, k, v = _inputs("samples", 16, dtype, seed=3)
    kw = dict(window=9, softcap=3.0)
    want = mk.tree_attention(q, k, v, meta, backend="reference", **kw)
    got = mk.tree_attention(q, k, v, meta, backend="triton", **kw)
    torch.testing.assert_close(got.float(), want.float(), **tolerance(dtype))


@pytest.mark.parametrize("kind", ["samples", pytest.param("extend", marks=pytest.mark.slow), "join"])
@pytest.mark.parametrize("spec", [dict(window=4), dict(softcap=2.0), dict(window=11, softcap=5.0)],
                         ids=["window", "softcap", "window+softcap"])
def test_backward_variants(kind, spec):
    """dq, dk, dv of the Triton backward (through the op, grads of out and lse) equal the reference's."""
    meta, q, k, v = _inputs(kind, 4, torch.float32, seed=7, scale=3.0)
    out, lse = mk.tree_attention(q, k, v, meta, backend="reference", return_lse=True, **spec)
    g = torch.Generator().manual_seed(1)
    go, gl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    args = (go, gl, q, k, v, out, lse, *meta.tensors(), meta.own_full, 0.125)
    extra = (spec.get("window", 0), spec.get("softcap", 0.0), None,
             meta.positions() if "window" in spec else None)
    want = _bw(*args, "reference", True, *extra)
    got = _bw(*args, "triton", True, *extra)
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_softcap_saturates():
    """Scores far beyond the cap (|s0| ~ 100 c): tanh saturates to +-1 without inf / NaN, forward and
    backward (the derivative 1 - tanh^2 goes to 0)."""
    meta, q, k, v = _inputs("samples", 4, torch.float32, seed=5, scale=40.0)
    want, wl = mk.tree_attention(q, k, v, meta, backend="reference", softcap=1.0, return_lse=True)
    got, gl = mk.tree_attention(q, k, v, meta, backend="triton", softcap=1.0, return_lse=True)
    torch.testing.assert_close(got, want, **tolerance(torch.float32))
    torch.testing.assert_close(gl, wl, **tolerance(torch.float32))
    args = (torch.ones_like(got), None, q, k, v, got, gl, *meta.tensors(), meta.own_full, 0.125)
    grads = _bw(*args, "triton", True, 0, 1.0, None, None)
    for a, b in zip(grads, _bw(*args, "reference", True, 0, 1.0, None, None), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_autograd_with_variants():
    """tree_attention(backend="triton", window=, softcap=, sinks=) differentiates through the Triton
    backward: gradients of q, k, v and sinks equal the reference backend's autograd."""
    meta, q0, k0, v0 = _inputs("join", 4, torch.float32, seed=11)
    sinks0 = torch.randn(8, generator=torch.Generator().manual_seed(2))
    grads = {}
    for backend in ("triton", "reference"):
        q, k, v, s = (t.clone().requires_grad_() for t in (q0, k0, v0, sinks0))
        out, lse = mk.tree_attention(q, k, v, meta, backend=backend, window=6, softcap=4.0, sinks=s,
                                     return_lse=True)
        (out.square().sum() + 0.3 * lse.sum()).backward()
        grads[backend] = (q.grad, k.grad, v.grad, s.grad)
    for a, b in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_fp8_nan_and_range(fp8):
    """fp8 caches with per-head scales: the largest finite value of the format (no overflow after the
    exact conversion to fp16); for e5m2 also a NaN in one sample's V, which poisons exactly the output
    dims of the rows that see it (docs/errors.md). (The Triton 3.8 interpreter converts an e4m3fn NaN to
    480.0 and an e5m2 NaN / Inf to finite fp32 values: NaN / Inf in fp8 caches are compiled-only for
    e4m3; the kernel converts fp8 to fp16 where it tests for them, exact and right for e5m2.)"""
    meta, q, k, v = _inputs("samples", 4, torch.float16, seed=9)
    big = torch.finfo(fp8).max
    kq = (k.float() * 0.05).to(fp8)
    vq = v.float().to(fp8)
    vq.view(-1, 2, 64)[meta.node_token_slots(0)[3], 1, 5] = big  # a large V value in the prompt
    if fp8 == torch.float8_e5m2:
        vq.view(-1, 2, 64)[meta.node_token_slots(2)[3], 0, 7] = float("nan")  # in one sample's tokens
    ks = torch.tensor([0.5, 2.0])
    vs = torch.tensor([1.0 / big, 0.25])
    want = mk.tree_attention(q, kq, vq, meta, backend="reference", k_scale=ks, v_scale=vs)
    got = mk.tree_attention(q, kq, vq, meta, backend="triton", k_scale=ks, v_scale=vs)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and not nan.all(-1).any()
    assert nan.any() == (fp8 == torch.float8_e5m2)
    torch.testing.assert_close(got.float()[~nan], want.float()[~nan], **tolerance(torch.float16))


def test_plan_reader_lo():
    """The forward's per-reader window start: computed from the positions for a plan built without a
    window (also the dK/dV kernel's), the planner's ``reader_lo`` when the plan holds this window; a plan
    built for a smaller window is refused by name."""
    meta, q, k, v = _inputs("samples", 4, torch.float32)
    plan = plan_tree_attention(meta, 8, 2, head_dim=64)
    lo = _ta.plan_reader_lo(plan, meta, 4, meta.total_q)
    pos = meta.positions().long()
    rpos = _ta.row_positions(meta, meta.total_q).long()
    assert rpos.tolist() == [pos[n] + int(meta.node_len[n]) - ql + i for n, ql in
                             zip(meta.vis_nodes[(meta.vis_indptr[1:] - 1).clamp(min=0)].tolist(),
                                 (meta.qo_indptr[1:] - meta.qo_indptr[:-1]).tolist(), strict=True)
                             for i in range(ql)]
    # reader r of node n (the items list each reader with its node)
    node_of = {}
    for w in range(plan.num_items):
        s0, nr = int(plan.item_reader_start[w]), int(plan.item_num_readers[w])
        for r in range(s0, s0 + nr):
            node_of[r] = int(plan.item_node[w])
    want = [max(0, int(rpos[plan.reader_row[r]]) - int(pos[node_of[r]]) - 3) for r in range(plan.num_readers)]
    assert lo[:plan.num_readers].tolist() == want
    if "reader_lo" in plan.TENSOR_FIELDS:
        wplan = plan_tree_attention(meta, 8, 2, head_dim=64, window=4)
        assert _ta.plan_reader_lo(wplan, meta, 4, meta.total_q) is wplan.reader_lo
        with pytest.raises(MetadataError, match="plan.window"):
            _ta.plan_reader_lo(wplan, meta, 9, meta.total_q)
        got = mk.tree_attention(q, k, v, meta, backend="triton", window=4, plan=wplan)
        with pytest.raises(MetadataError, match="plan.window"):  # a plan for another window is refused
            mk.tree_attention(q, k, v, meta, backend="triton", window=5, plan=wplan, validate=False)
        assert wplan.num_readers < plan.num_readers  # the window plan dropped readers that see nothing
        torch.testing.assert_close(got, mk.tree_attention(q, k, v, meta, backend="reference", window=4),
                                   **tolerance(torch.float32))


def test_variant_flags_and_plain_path():
    """Plain calls launch the plain kernel (every variant flag off); the dispatcher turns on exactly the
    variant's flags; the backends declare what they run."""
    from multiverse_kernels.backends import resolve

    cpu = torch.device("cpu")
    plain = _ta.attn_config(64, torch.float16, 4, 4, cpu)
    assert not (plain.SOFTCAP or plain.WINDOW or plain.KV_FP8)
    assert _ta.attn_config(64, torch.float16, 4, 4, cpu, Variant(softcap=1.0)).SOFTCAP
    one = torch.ones(1)
    f8 = _ta.attn_config(64, torch.float16, 4, 4, cpu, Variant(window=3, k_scale=one, v_scale=one))
    assert f8.WINDOW and f8.KV_FP8 and not f8.SOFTCAP
    assert resolve("tree_attention", "triton", cpu).variants == {"softcap", "window", "fp8"}
    assert resolve("tree_attention_backward", "triton", cpu).variants == {"softcap", "window"}
