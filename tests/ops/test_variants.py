"""Attention variants (multiverse_kernels/variants.py, docs/design.md "Attention variants"): sliding
window over forest positions, logit soft-cap, attention sinks, fp8 KV caches.

* The reference (the spec) equals an independent dense float64 oracle written here from the definitions
  (dense mask x window by position, c * tanh(s / c), exp(sink) in the denominator, dequantized fp8), on
  random forests (joins, empty and one-token nodes, page sizes 1 / 4 / 16, GQA), with KVForest positions
  and with the default positions.
* Gradients: gradcheck of the reference in float64 (q, k, v, sinks), and the reference backward equals
  autograd through the dense oracle.
* Every other backend either declares a variant (``impl.variants``) and then equals the reference on
  poisoned outputs, or raises NotImplementedError naming it; ``auto`` never drops a variant.
* Positions: KVForest's joins continue after the longest joined node, the default positions are depths.
* Bad input: a clear MetadataError naming the argument.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.backends import available_backends, resolve
from multiverse_kernels.dense_mask import dense_mask, key_slots
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.testing import backend_params, compact_pages, random_forest, tolerance
from multiverse_kernels.variants import FP8_DTYPES, variant_names

VARIANTS = {
    "window": dict(window=3),
    "softcap": dict(softcap=2.5),
    "sinks": dict(sinks=True),
    "window+softcap+sinks": dict(window=5, softcap=4.0, sinks=True),
}


def _positions(meta):
    """(key positions in key_slots order, row positions) from meta.positions(), written independently of
    the reference: node n's token j is at node_pos[n] + j; a row is its own node's token."""
    pos = meta.positions().long()
    lens = meta.node_len.long()
    kpos = torch.cat([pos[n] + torch.arange(int(lens[n])) for n in range(meta.num_nodes)] or
                     [torch.zeros(0, dtype=torch.long)])
    rpos = []
    qo, vi, vis = meta.qo_indptr.tolist(), meta.vis_indptr.tolist(), meta.vis_nodes.tolist()
    for g in range(meta.num_groups):
        ql = qo[g + 1] - qo[g]
        if ql:
            own = vis[vi[g + 1] - 1]
            rpos.append(pos[own] + lens[own] - ql + torch.arange(ql))
    return kpos, (torch.cat(rpos) if rpos else torch.zeros(0, dtype=torch.long))


def dense_oracle(q, k_cache, v_cache, meta, sm_scale, window=None, softcap=None, sinks=None, k_scale=None,
                 v_scale=None):
    """float64 (out, lse) from the definitions over the L x L mask."""
    hq, hk = q.shape[1], k_cache.shape[2]
    slots = key_slots(meta)
    k = k_cache.reshape(-1, hk, k_cache.shape[-1])[slots].double()
    v = v_cache.reshape(-1, hk, v_cache.shape[-1])[slots].double()
    if k_scale is not None:
        k = k * k_scale.double().reshape(-1, 1)
        v = v * v_scale.double().reshape(-1, 1)
    k = k.repeat_interleave(hq // hk, 1)
    v = v.repeat_interleave(hq // hk, 1)
    mask = dense_mask(meta)
    if window is not None:
        kpos, rpos = _positions(meta)
        mask = mask & ((rpos[:, None] - kpos[None, :]) < window)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * sm_scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask[None], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[:, None, None].expand(hq, s.shape[1], 1)], -1)
        v = torch.cat([v, torch.zeros(1, hq, v.shape[-1], dtype=v.dtype)], 0)
    lse = torch.logsumexp(s, -1)  # [Hq, rows]
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", p, v)
    return out, lse.T


def _case(seed, page_size, dtype=torch.float64, hq=4, hk=2, d=16, max_len=12):
    f, groups = random_forest(seed, page_size=page_size, max_len=max_len, max_nodes=8, max_q_len=4)
    meta, num_pages = compact_pages(f.metadata(groups))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(meta.total_q, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(num_pages, page_size, hk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(num_pages, page_size, hk, d, generator=g, dtype=torch.float64).to(dtype)
    return meta, q, k, v


def _kwargs(spec, hq, dtype=torch.float32, seed=0):
    kw = dict(spec)
    if kw.pop("sinks", None):
        kw["sinks"] = torch.randn(hq, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return kw


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("positions", ["forest", "default"])
def test_reference_equals_dense_oracle(name, page_size, positions):
    for seed in range(3):
        meta, q, k, v = _case(100 * page_size + seed, page_size)
        if positions == "default":
            meta = meta.with_node_pos(None)
        kw = _kwargs(VARIANTS[name], q.shape[1], torch.float64, seed)
        out, lse = mk.tree_attention(q, k, v, meta, backend="reference", return_lse=True, **kw)
        want_o, want_l = dense_oracle(q, k, v, meta, q.shape[-1] ** -0.5, **kw)
        torch.testing.assert_close(out, want_o, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse.double(), want_l, atol=1e-5, rtol=1e-6)  # lse is float32


def test_window_and_sinks_change_the_answer():
    """A test that cannot fail is a defect: each variant moves the output on these inputs."""
    meta, q, k, v = _case(7, 4, max_len=20)
    base = mk.tree_attention(q, k, v, meta, backend="reference")
    for name, spec in VARIANTS.items():
        kw = _kwargs(spec, q.shape[1], torch.float64)
        got = mk.tree_attention(q, k, v, meta, backend="reference", **kw)
        assert (got - base).abs().max() > 1e-3, name


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if "+" in n else pytest.mark.slow)
                                  for n in VARIANTS])
def test_reference_gradcheck(name):
    meta, q, k, v = _case(11, 2, hq=2, hk=1, d=4, max_len=6)
    kw = _kwargs(VARIANTS[name], q.shape[1], torch.float64)
    sinks = kw.pop("sinks", None)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    if sinks is not None:
        args.append(sinks.clone().requires_grad_())

    def fn(*a):
        extra = dict(kw, sinks=a[3]) if sinks is not None else kw
        # out only: lse is float32 (its gradient is checked against the dense oracle below)
        return mk.tree_attention(a[0], a[1], a[2], meta, backend="reference", **extra)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_backward_equals_dense_autograd(name):
    meta, q, k, v = _case(23, 4)
    kw = _kwargs(VARIANTS[name], q.shape[1], torch.float64, seed=3)
    sinks = kw.pop("sinks", None)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    if sinks is not None:
        ins.append(sinks.clone().requires_grad_())
    go = torch.randn(q.shape, dtype=torch.float64)
    gl = torch.randn(q.shape[:2], dtype=torch.float64)

    def loss(out, lse):
        return (out * go).sum() + (lse.double() * gl).sum()

    extra = dict(kw, sinks=ins[3]) if sinks is not None else kw
    loss(*mk.tree_attention(*ins[:3], meta, backend="reference", return_lse=True, **extra)).backward()
    ref = [t.grad.clone() for t in ins]
    for t in ins:
        t.grad = None
    loss(*dense_oracle(*ins[:3], meta, q.shape[-1] ** -0.5, **extra)).backward()
    for got, want in zip(ref, [t.grad for t in ins], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", backend_params(exclude=("reference",)))
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_implement_or_refuse(backend, name, dtype, poisoned):
    """A backend that declares the variant equals the reference (forward and backward); one that does
    not raises NotImplementedError naming it: never a silently dropped variant."""
    from multiverse_kernels.testing import backend_device

    dev = backend_device(backend)
    meta, q, k, v = _case(31, 16, dtype=dtype, hq=8, hk=2, d=64, max_len=40)
    meta, q, k, v = meta.to(dev), q.to(dev), k.to(dev), v.to(dev)
    kw = _kwargs(VARIANTS[name], q.shape[1], seed=5)
    kw = {key: (val.to(dev) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    # sinks run on every backend (the op merges the sink state into a kernel's output when the kernel
    # does not add it itself); window and soft-cap are the kernels'
    need = {n for n in ("window", "softcap") if n in name}
    impl = resolve("tree_attention", backend, torch.device(dev))
    if not need <= variant_names(impl):
        with pytest.raises(NotImplementedError, match="|".join(sorted(need - variant_names(impl)))):
            mk.tree_attention(q, k, v, meta, backend=backend, **kw)
        return
    want, wl = mk.tree_attention(q, k, v, meta, backend="reference", return_lse=True, **kw)
    got, gl = mk.tree_attention(q, k, v, meta, backend=backend, return_lse=True, **kw)
    tol = tolerance(dtype)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(gl, wl, **tol)
    if backend not in available_backends("tree_attention_backward", torch.device(dev)):
        return  # no backward of its own (cuda): autograd runs auto's, tested as that backend's
    bw = resolve("tree_attention_backward", backend, torch.device(dev))
    if need <= variant_names(bw):  # a declared backward: dq, dk, dv equal the reference backward's
        _compare_grads(backend, meta, q, k, v, kw, dtype)


def _compare_grads(backend, meta, q, k, v, kw, dtype):
    """Gradients of (out * go + lse * gl).sum() w.r.t. q, k, v: ``backend`` vs the reference."""
    g = torch.Generator().manual_seed(9)
    go = torch.randn(q.shape, generator=g).to(q.device)
    gl = torch.randn(q.shape[:2], generator=g).to(q.device)
    grads = []
    for b in (backend, "reference"):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = mk.tree_attention(*ins, meta, backend=b, return_lse=True, **kw)
        ((out.float() * go).sum() + (lse * gl).sum()).backward()
        grads.append([t.grad.float() for t in ins])
    tol = tolerance(dtype)
    for name, a, b in zip("qkv", *grads, strict=True):  # grads sum many terms: 5x the output tolerance
        torch.testing.assert_close(a, b, atol=5 * tol["atol"], rtol=5 * tol["rtol"],
                                   msg=lambda m, n=name: f"d{n}: {m}")


def test_auto_never_drops_a_variant():
    meta, q, k, v = _case(41, 4, dtype=torch.float32)
    for spec in VARIANTS.values():
        kw = _kwargs(spec, q.shape[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "running the reference" where no kernel has it
            got = mk.tree_attention(q, k, v, meta, **kw)
        want = mk.tree_attention(q, k, v, meta, backend="reference", **kw)
        torch.testing.assert_close(got, want, **tolerance(torch.float32))


def test_sinks_epilogue_on_a_kernel_without_sinks():
    """A backend without sink kernels gets its (out, lse) merged with the sink state by the op."""
    from multiverse_kernels.ops.tree_attention import add_sinks

    meta, q, k, v = _case(43, 4, dtype=torch.float64)
    sinks = torch.randn(q.shape[1], dtype=torch.float64)
    o0, l0 = mk.tree_attention(q, k, v, meta, backend="reference", return_lse=True)
    o1, l1 = add_sinks(o0, l0.double(), sinks)
    want_o, want_l = dense_oracle(q, k, v, meta, q.shape[-1] ** -0.5, sinks=sinks)
    torch.testing.assert_close(o1, want_o, atol=1e-6, rtol=1e-6)  # l0 is float32
    torch.testing.assert_close(l1, want_l, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_cache_reference(fp8, per_head):
    meta, q, k, v = _case(51, 4, dtype=torch.float32, hq=4, hk=2)
    ks = torch.rand(2 if per_head else 1) + 0.5
    vs = torch.rand(2 if per_head else 1) + 0.5
    kq, vq = (k / ks.reshape(-1, 1)).to(fp8), (v / vs.reshape(-1, 1)).to(fp8)
    qb = q.to(torch.bfloat16)
    out, lse = mk.tree_attention(qb, kq, vq, meta, backend="reference", k_scale=ks, v_scale=vs,
                                 return_lse=True)
    want_o, want_l = dense_oracle(qb, kq, vq, meta, q.shape[-1] ** -0.5, k_scale=ks, v_scale=vs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want_o, **tolerance(torch.bfloat16))
    torch.testing.assert_close(lse.double(), want_l, atol=1e-4, rtol=1e-4)
    with pytest.raises(NotImplementedError, match="fp8"):
        qg = qb.clone().requires_grad_()
        mk.tree_attention(qg, kq, vq, meta, backend="reference", k_scale=ks, v_scale=vs).sum().backward()


def test_forest_positions():
    f = mk.KVForest(64, 4)
    root = f.new_sequence(10)
    a, b = f.fork(root, 2)
    f.append(a, 7)
    f.append(b, 3)
    c = f.join([a, b])
    f.append(c, 2)
    meta = f.metadata([(a, 1), (b, 1), (c, 2)])
    assert meta.node_pos.tolist() == [0, 10, 10, 17]  # the conclusion follows the longest path
    assert meta.default_node_pos().tolist() == [0, 10, 10, 20]  # default: after every joined path
    assert f.metadata([(c, 2), (a, 1)]).default_node_pos().tolist() == [0, 10, 17, 20]  # first list names b
    chain = mk.KVForest(64, 4)
    r = chain.new_sequence(5)
    (x,) = chain.fork(r, 1)
    chain.append(x, 3)
    m2 = chain.metadata([(x, 1)])
    assert m2.default_node_pos().tolist() == m2.node_pos.tolist() == [0, 5]


def test_bad_variant_arguments():
    meta, q, k, v = _case(61, 4, dtype=torch.float32)
    cases = [
        (dict(window=0), "window"), (dict(window=-3), "window"), (dict(window=2.5), "window"),
        (dict(softcap=0.0), "softcap"), (dict(softcap=-1.0), "softcap"),
        (dict(softcap=float("inf")), "softcap"),
        (dict(sinks=torch.zeros(3)), "sinks"), (dict(sinks=torch.zeros(4, dtype=torch.float16)), "sinks"),
        (dict(sinks=[0.0] * 4), "sinks"), (dict(k_scale=torch.ones(1), v_scale=torch.ones(1)), "k_cache"),
    ]
    for kw, name in cases:
        with pytest.raises(MetadataError, match=name):
            mk.tree_attention(q, k, v, meta, backend="reference", **kw)
    kq = k.to(torch.float8_e4m3fn)
    with pytest.raises(MetadataError, match="k_scale"):
        mk.tree_attention(q.bfloat16(), kq, kq, meta, backend="reference")
    with pytest.raises(MetadataError, match="q"):
        mk.tree_attention(q, kq, kq, meta, backend="reference", k_scale=torch.ones(1), v_scale=torch.ones(1))
    with pytest.raises(MetadataError, match="v_scale"):
        mk.tree_attention(q.bfloat16(), kq, kq, meta, backend="reference", k_scale=torch.ones(1),
                          v_scale=torch.ones(3))
    bad = meta.with_node_pos(torch.zeros(meta.num_nodes + 1, dtype=torch.int32))
    with pytest.raises(MetadataError, match="node_pos"):
        mk.tree_attention(q, k, v, bad, backend="reference", window=4)
    bad = meta.with_node_pos(torch.zeros(meta.num_nodes, dtype=torch.int64))
    with pytest.raises(MetadataError, match="node_pos"):
        mk.tree_attention(q, k, v, bad, backend="reference", window=4)


# ---- kernels' variants beyond the forward test above: backward (window / soft-cap) and fp8 caches.
# Written for any backend: one that declares the variant equals the reference, one that does not raises
# NotImplementedError naming it. Small forests (the Triton kernels run in the interpreter on CPU).

BACKWARD_VARIANTS = [pytest.param("window", marks=pytest.mark.slow), "softcap", "window+softcap+sinks"]


@pytest.mark.parametrize("backend", backend_params(exclude=("reference",)))
@pytest.mark.parametrize("name", BACKWARD_VARIANTS)
def test_backward_variants_implement_or_refuse(backend, name, poisoned):
    """The op tree_attention_backward with a window / soft-cap on ``backend``: dq, dk, dv (fp32) equal
    the reference backward's on the reference forward's out and lse (grads of out and lse)."""
    from multiverse_kernels.testing import backend_device

    dev = backend_device(backend)
    op = torch.ops.multiverse.tree_attention_backward
    need = {n for n in ("window", "softcap") if n in name}
    # a backend without any backward (cuda) is refused by name; autograd runs auto's backward for it
    impl = (resolve("tree_attention_backward", backend, torch.device(dev))
            if backend in available_backends("tree_attention_backward", torch.device(dev)) else None)
    for seed in range(2):
        meta, q, k, v = _case(71 + seed, (4, 16)[seed], dtype=torch.float32, hq=8, hk=2, d=64, max_len=40)
        meta, q, k, v = meta.to(dev), q.to(dev), k.to(dev), v.to(dev)
        kw = _kwargs(VARIANTS[name], q.shape[1], seed=seed)
        kw = {key: (val.to(dev) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
        out, lse = mk.tree_attention(q, k, v, meta, backend="reference", return_lse=True, **kw)
        g = torch.Generator().manual_seed(seed)
        go = torch.randn(out.shape, generator=g).to(dev)
        gl = torch.randn(lse.shape, generator=g).to(dev)
        args = (go, gl, q, k, v, out, lse, *meta.tensors(), meta.own_full, q.shape[-1] ** -0.5)
        extra = (kw.get("window", 0), kw.get("softcap", 0.0), kw.get("sinks"),
                 meta.positions() if "window" in kw else None)
        if impl is None:
            with pytest.raises(RuntimeError, match=f"{backend}.*not available for tree_attention_backward"):
                op(*args, backend, True, *extra)
            return
        if not need <= variant_names(impl):
            with pytest.raises(NotImplementedError, match="|".join(sorted(need - variant_names(impl)))):
                op(*args, backend, True, *extra)
            return
        want = op(*args, "reference", True, *extra)
        got = op(*args, backend, True, *extra)
        for gname, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, n=gname, s=seed: f"{n}, seed {s}: {m}")


FP8_CASES = [  # (fp8 cache dtype, per KV head scales, q dtype, other variants)
    pytest.param(torch.float8_e4m3fn, False, torch.float16, {}, id="e4m3-tensor-fp16"),
    pytest.param(torch.float8_e5m2, True, torch.bfloat16, {}, id="e5m2-head-bf16"),
    pytest.param(torch.float8_e4m3fn, True, torch.bfloat16, {}, id="e4m3-head-bf16", marks=pytest.mark.slow),
    pytest.param(torch.float8_e5m2, False, torch.float16, {}, id="e5m2-tensor-fp16", marks=pytest.mark.slow),
    pytest.param(torch.float8_e4m3fn, True, torch.float16, dict(window=5, softcap=4.0, sinks=True),
                 id="e4m3-head-fp16-window+softcap+sinks", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("backend", backend_params(exclude=("reference",)))
@pytest.mark.parametrize(("fp8", "per_head", "qdtype", "spec"), FP8_CASES)
def test_fp8_cache_implement_or_refuse(backend, fp8, per_head, qdtype, spec, poisoned):
    """An fp8 KV cache (per-tensor or per-KV-head float32 scales) on ``backend`` equals the reference
    (which dequantizes at the load), or the backend raises NotImplementedError naming fp8."""
    from multiverse_kernels.testing import backend_device

    dev = backend_device(backend)
    meta, q, k, v = _case(81, 16, dtype=torch.float32, hq=8, hk=2, d=64, max_len=40)
    gen = torch.Generator().manual_seed(3)
    ks = torch.rand(2 if per_head else 1, generator=gen) + 0.5
    vs = torch.rand(2 if per_head else 1, generator=gen) + 0.5
    kq, vq = (k / ks.reshape(-1, 1)).to(fp8), (v / vs.reshape(-1, 1)).to(fp8)
    meta, q, kq, vq, ks, vs = (t.to(dev) for t in (meta, q.to(qdtype), kq, vq, ks, vs))
    kw = _kwargs(spec, q.shape[1], seed=4)
    kw = {key: (val.to(dev) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    need = {"fp8"} | {n for n in ("window", "softcap") if n in kw}
    impl = resolve("tree_attention", backend, torch.device(dev))
    if not need <= variant_names(impl):
        with pytest.raises(NotImplementedError, match="|".join(sorted(need - variant_names(impl)))):
            mk.tree_attention(q, kq, vq, meta, backend=backend, k_scale=ks, v_scale=vs, **kw)
        return
    want, wl = mk.tree_attention(q, kq, vq, meta, backend="reference", return_lse=True, k_scale=ks,
                                 v_scale=vs, **kw)
    got, gl = mk.tree_attention(q, kq, vq, meta, backend=backend, return_lse=True, k_scale=ks, v_scale=vs,
                                **kw)
    assert got.dtype == qdtype
    tol = tolerance(qdtype)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(gl, wl, **tol)


def test_variants_trace_under_torch_compile():
    """The op's variant arguments (and the C++ run op's soft-cap) have fake implementations: a compiled
    fullgraph call equals the eager reference."""
    from multiverse_kernels.testing import make_inputs, multiverse_forest

    f, groups = multiverse_forest(40, 3, 9, 4, page_size=4, concl_q=2)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 8, 2, 64, torch.float32)
    sinks = torch.randn(8)
    kw = dict(softcap=3.0, window=20, sinks=sinks)
    fn = torch.compile(lambda q, k, v: mk.tree_attention(q, k, v, meta, **kw), fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = fn(q, k, v)
    torch.testing.assert_close(got, mk.tree_attention(q, k, v, meta, backend="reference", **kw),
                               **tolerance(torch.float32))
