"""Triton tree-attention backward (dK/dV and dQ kernels) in the Triton interpreter against the reference
backward (the spec), and the autograd of ``tree_attention(backend="triton")``.

See tests/_triton_interp.py for what the interpreter covers (bf16 math runs in fp32 on CPU). ``dq`` is
poisoned with NaN before every launch; ``dk``/``dv`` slots that no row sees must come back exactly 0.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _triton_interp import triton_interpreter  # noqa: F401  (module fixture)

import multiverse_kernels as mk
from multiverse_kernels.backends import available_backends, resolve
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.ops import tree_attention_backward
from multiverse_kernels.testing import make_inputs, multiverse_forest, random_forest, sampling_forest

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GQA = ((2, 2), (4, 2), (4, 1), (8, 1))
HEAD_DIMS = (64, 128, 256)
PAGE_SIZES = (1, 4, 16)
# gradients sum many products: a little looser than the forward's tolerance(dtype)
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=6e-3, rtol=6e-3),
            torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


@pytest.fixture(scope="module", autouse=True)
def poison_dq():
    bw = importlib.import_module("multiverse_kernels.backends.triton.tree_attention_backward")
    bw.POISON = True
    yield
    bw.POISON = False


def _compact(meta: mk.ForestMetadata, extra: int = 2) -> tuple[mk.ForestMetadata, int]:
    """The same forest over a small pool (used pages renumbered, shuffled, plus ``extra`` unused pages
    whose gradients must stay 0): random forests allocate from a 4096-page pool, and the backward's
    dk/dv are cache-sized. Returns (meta, num_pages)."""
    used = torch.unique(meta.node_page_indices.long())
    n = used.numel() + extra
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:used.numel()]
    remap = torch.full((int(used.max()) + 1 if used.numel() else 1,), -1, dtype=torch.long)
    remap[used] = perm
    pages = remap[meta.node_page_indices.long()].to(torch.int32)
    return mk.ForestMetadata(meta.node_page_indptr, pages, meta.node_len, meta.qo_indptr, meta.vis_indptr,
                             meta.vis_nodes, meta.page_size, meta.own_full), n


def _seen_slots(meta: mk.ForestMetadata, num_slots: int) -> torch.Tensor:
    seen = torch.zeros(num_slots, dtype=torch.bool)
    qo, vi, vis = meta.qo_indptr.tolist(), meta.vis_indptr.tolist(), meta.vis_nodes.tolist()
    for g in range(meta.num_groups):
        if qo[g + 1] > qo[g]:
            for n in vis[vi[g]:vi[g + 1]]:
                seen[meta.node_token_slots(n)] = True
    return seen


def _compare(meta, num_pages, hq, hk, d, dtype, seed=0, sm_scale=None, with_lse=True):
    q, k, v = make_inputs(meta, num_pages, hq, hk, d, dtype, seed=seed)
    sm = d ** -0.5 if sm_scale is None else sm_scale
    out, lse = mk.tree_attention(q, k, v, meta, sm_scale=sm, return_lse=True, backend="reference")
    g = torch.Generator().manual_seed(seed + 7)
    go = torch.randn(out.shape, generator=g).to(dtype)
    gl = torch.randn(lse.shape, generator=g) if with_lse else None
    got = tree_attention_backward(go, q, k, v, out, lse, meta, grad_lse=gl, sm_scale=sm, backend="triton")
    ref = tree_attention_backward(go, q, k, v, out, lse, meta, grad_lse=gl, sm_scale=sm,
                                  backend="reference")
    unseen = ~_seen_slots(meta, k.shape[0] * k.shape[1])
    for name, a, b, like in zip(("dq", "dk", "dv"), got, ref, (q, k, v), strict=True):
        assert a.shape == like.shape and a.dtype == like.dtype, name
        assert not torch.isnan(a).any(), f"{name}: unwritten (poisoned) or NaN elements"
        torch.testing.assert_close(a, b, **GRAD_TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")
    for name, a in (("dk", got[1]), ("dv", got[2])):
        assert (a.reshape(-1, *a.shape[2:])[unseen] == 0).all(), f"{name}: unseen slots must be 0"
    return got, ref


# each seed picks one point of the grid (periods 3, 3, 3, 4 mixed by the seed)
@pytest.mark.parametrize("seed", range(12))
def test_random_forests(seed):
    d = HEAD_DIMS[seed % 3]
    dtype = DTYPES[(seed // 3) % 3] if seed < 9 else (torch.float32, torch.float16)[seed % 2]
    page_size = PAGE_SIZES[(seed // 2) % 3]
    hq, hk = GQA[seed % 4]
    f, groups = random_forest(seed, page_size=page_size, max_len=20, max_nodes=8)
    meta, num_pages = _compact(f.metadata(groups))
    if seed % 4 == 3:
        meta = meta.with_own_full(torch.arange(meta.num_groups) % 2 == 0)
    _compare(meta, num_pages, hq, hk, d, dtype, seed=seed, sm_scale=0.7 / d ** 0.5,
             with_lse=seed % 3 != 1)


@pytest.mark.parametrize("page_size,dtype,d", [(1, torch.float32, 64), (16, torch.float16, 128),
                                               (16, torch.float32, 64)])
def test_packed_training_sequence(page_size, dtype, d):
    """Training: every node its own group with q_len = node_len (Multiverse trunk, paths, conclusion).
    The trunk is longer than one dK/dV chunk and has more readers than one row tile, so chunks past
    a tile's causal limit are skipped and reader tiles loop."""
    f = mk.KVForest(512, page_size)
    trunk = f.new_sequence(70)
    paths = f.fork(trunk, 3)
    for p, n in zip(paths, (9, 1, 20), strict=True):
        f.append(p, n)
    concl = f.join(paths)
    f.append(concl, 6)
    meta = f.metadata([(trunk, 70)] + [(p, f.node_len(p)) for p in paths] + [(concl, 6)])
    _compare(*_compact(meta), 4, 2, d, dtype, seed=page_size)


def test_shared_prefix_many_readers():
    """A prompt read by 16 decode rows x GQA 4 (64 packed rows: two dK/dV row tiles)."""
    f, groups = sampling_forest(prompt=20, samples=16, gen_len=2, page_size=16)
    _compare(f.metadata(groups), f.num_pages, 8, 2, 64, torch.float16)
    f, groups = multiverse_forest(prefix=12, paths=3, path_len=4, concl_len=3, concl_q=2, page_size=1)
    _compare(f.metadata(groups), f.num_pages, 4, 1, 64, torch.float32)


def test_rows_that_see_nothing_and_empty_groups():
    """Empty nodes, q_len-0 groups and a row whose lse is -inf (its grad_lse ignored): no NaN."""
    f = mk.KVForest(32, 4)
    root = f.new_sequence(5)
    e = f.fork(root, 1)[0]  # empty node
    c = f.fork(e, 1)[0]
    f.append(c, 2)
    meta = f.metadata([(e, 0), (c, 2)])
    _compare(meta, f.num_pages, 2, 2, 64, torch.float32)
    # a row that sees nothing: its group lists only an empty node... simulated with lse = -inf
    q, k, v = make_inputs(meta, f.num_pages, 2, 2, 64, torch.float32)
    out, lse = mk.tree_attention(q, k, v, meta, return_lse=True, backend="reference")
    lse[0] = float("-inf")
    out[0] = 0
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    got = tree_attention_backward(go, q, k, v, out, lse, meta, grad_lse=gl, backend="triton")
    ref = tree_attention_backward(go, q, k, v, out, lse, meta, grad_lse=gl, backend="reference")
    assert (got[0][0] == 0).all()
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **GRAD_TOL[torch.float32])
    no_rows = f.metadata([(c, 0)])
    q, k, v = make_inputs(no_rows, f.num_pages, 2, 2, 64, torch.float16)
    out = torch.zeros(0, 2, 64, dtype=torch.float16)
    lse = torch.zeros(0, 2)
    dq, dk, dv = tree_attention_backward(out, q, k, v, out, lse, no_rows, backend="triton")
    assert dq.shape == (0, 2, 64) and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_uses_the_triton_backward(dtype, monkeypatch):
    """tree_attention(backend="triton") differentiates through out and lse with the Triton kernels;
    gradients equal the reference backend's autograd."""
    from multiverse_kernels import backends

    assert "triton" in available_backends("tree_attention_backward", "cpu")
    fn, devs = backends._IMPLS["tree_attention_backward"]["triton"]
    assert "cuda" in devs
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    monkeypatch.setitem(backends._IMPLS["tree_attention_backward"], "triton", (spy, devs))
    f, groups = random_forest(3, page_size=4, max_len=16, max_nodes=6)
    meta, num_pages = _compact(f.metadata(groups))
    grads = {}
    for backend in ("triton", "reference"):
        q, k, v = (t.requires_grad_() for t in make_inputs(meta, num_pages, 4, 2, 64, dtype, seed=1))
        out, lse = mk.tree_attention(q, k, v, meta, return_lse=True, backend=backend)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        live = torch.isfinite(lse)
        loss = (out.float() * w.float()).sum() + 0.3 * torch.where(live, lse, 0).sum()
        loss.backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    assert len(calls) == 1
    for a, b in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(a, b, **GRAD_TOL[dtype])


def test_auto_on_cuda_prefers_triton_backward():
    from multiverse_kernels import backends

    backends._load()
    impl = backends._IMPLS["tree_attention_backward"]
    order = [b for b in backends.AUTO_ORDER["cuda"] if b in impl and "cuda" in impl[b][1]]
    assert order[0] == "triton", order  # auto on CUDA tensors resolves to the Triton backward
    assert resolve("tree_attention_backward", "triton", torch.device("cpu")) is impl["triton"][0]


def test_bad_inputs():
    f, groups = sampling_forest(prompt=8, samples=2, gen_len=2)
    meta = f.metadata(groups)
    for dtype, d, match in ((torch.float64, 64, "float16"), (torch.float32, 96, "head_dim")):
        q, k, v = make_inputs(meta, f.num_pages, 4, 2, d, dtype)
        out = torch.zeros_like(q)
        lse = torch.zeros(q.shape[:2])
        with pytest.raises(MetadataError, match=match):
            tree_attention_backward(out, q, k, v, out, lse, meta, backend="triton")
    q, k, v = make_inputs(meta, f.num_pages, 64, 1, 256, torch.float16)
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:2])
    with pytest.raises(MetadataError, match="GQA group"):
        tree_attention_backward(out, q, k, v, out, lse, meta, backend="triton")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12, 36))
def test_random_forests_sweep(seed):
    """Larger forests, page sizes up to 32, GQA up to 16."""
    d = HEAD_DIMS[seed % 3]
    dtype = DTYPES[(seed // 3) % 3]
    page_size = (1, 4, 16, 32)[seed % 4]
    hq, hk = ((2, 2), (4, 2), (8, 2), (8, 1), (16, 1))[(seed // 2) % 5]
    f, groups = random_forest(seed, page_size=page_size, max_len=48, max_nodes=12)
    _compare(*_compact(f.metadata(groups)), hq, hk, d, dtype, seed=seed)


def test_rl_group_through_a_tiny_model():
    """A GRPO group packed (multiverse_kernels.rl) through a tiny transformers model whose attention
    runs forward and backward on the triton backend: log-probs and parameter gradients equal the
    unpacked runs' (float32)."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from test_rl import grpo_loss, tiny_model, unpacked_logprobs

    from multiverse_kernels.rl import pack_group, rollout_forward

    model, alone = tiny_model(head_dim=64)
    g = torch.Generator().manual_seed(4)
    p = pack_group(torch.randint(0, 50, (10,), generator=g),
                   [torch.randint(0, 50, (n,), generator=g) for n in (4, 1, 6)])
    lp = p.token_logprobs(rollout_forward(model, p, backend="triton"))
    adv = torch.tensor([1.0, -0.5, 0.25])
    grpo_loss(p.per_sequence(lp, trainable_only=True), adv).backward()
    for i, s in enumerate(p.sequences):
        ref = unpacked_logprobs(alone, p.token_ids[s])
        torch.testing.assert_close(lp[s][1:], ref, atol=5e-5, rtol=5e-5)
        grpo_loss([ref[10 - 1:]], adv[i:i + 1]).backward()
    for (name, a), b in zip(model.named_parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=lambda m, nm=name: f"{nm}: {m}")
