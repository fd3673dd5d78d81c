"""fp8 KV caches in the C++ CPU forward kernel (docs/design.md "Attention variants"), on every ISA
build this machine can run (baseline, AVX2, AVX-512: MULTIVERSE_CPU_ISA forced as in test_cpu_isa.py).

* The dequantization is exact: every one of the 256 byte values of both formats (e4m3fn: subnormals,
  448, NaN; e5m2: subnormals, inf, NaN), through the vector and the scalar-tail paths (head_dim 256 and
  259), equals torch's conversion times the scale (one float32 rounding).
* Random forests (float8_e4m3fn / float8_e5m2, per-tensor and per-KV-head scales, float16 / bfloat16
  q, head dims 64 / 128 / 256 and odd 67, page sizes 1 and 16, GQA, with window and soft-cap) against
  the float64 reference (the specification), outputs poisoned so an unwritten element fails; plus
  hypothesis-drawn forests (tests/_strategies.py) on the default ISA.
* The kernel's byte counter counts 1 byte per fp8 element; the NaN policy holds for fp8 specials.
* Bad input (missing or malformed scales, scales without fp8 caches, float32 q, mixed fp8 formats, the
  backward) raises a clear error naming the argument.
"""

from __future__ import annotations

import pytest
import torch
from _strategies import NUM_PAGES, forests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multiverse_kernels as mk
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.planning import plan_kv_tokens, plan_tree_attention
from multiverse_kernels.testing import (
    assert_close_to_reference,
    import_cpu_backend_or_skip,
    lse_tolerance,
    multiverse_forest,
    random_forest,
    sampling_forest,
    tolerance,
)
from multiverse_kernels.variants import FP8_DTYPES, Variant

cpu_backend = import_cpu_backend_or_skip()

from _fp8 import fp8_inputs  # noqa: E402

from multiverse_kernels.backends.reference import tree_attention as ref_attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned")
FP8_IDS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}




def _check_fp8(meta, num_pages: int, hq: int, hk: int, d: int, qdtype: torch.dtype, fp8: torch.dtype,
               scales: str, seed: int, **variant) -> None:
    """cpu (out, lse) with fp8 caches against the float64 reference on the same fp8 bytes and scales
    (the reference backend called directly: float64 math, dequantized at the load)."""
    q, kq, vq, ks, vs = fp8_inputs(meta, num_pages, hq, hk, d, qdtype, fp8, scales, seed)
    sm = d ** -0.5
    out, lse = mk.tree_attention(q, kq, vq, meta, sm_scale=sm, backend="cpu", return_lse=True, k_scale=ks,
                                 v_scale=vs, **variant)
    want_o, want_l = ref_attention(q.double(), kq, vq, meta, sm,
                                   variant=Variant(k_scale=ks, v_scale=vs, **variant))
    assert_close_to_reference("out", out, want_o, like=q, **tolerance(qdtype))
    assert lse.dtype == torch.float32
    assert_close_to_reference("lse", lse, want_l, **lse_tolerance(qdtype))


# (fp8, scales, q dtype, head_dim, page size, (Hq, Hk), variant)
CASES = [
    (torch.float8_e4m3fn, "tensor", torch.float16, 64, 1, (8, 2), {}),
    (torch.float8_e5m2, "head", torch.bfloat16, 128, 16, (4, 4), {}),
    (torch.float8_e4m3fn, "head", torch.bfloat16, 256, 16, (8, 1), dict(window=7)),
    (torch.float8_e5m2, "tensor", torch.float16, 67, 1, (6, 3), dict(softcap=3.0)),
    (torch.float8_e4m3fn, "head", torch.float16, 128, 16, (8, 2), dict(window=9, softcap=5.0)),
    (torch.float8_e5m2, "head", torch.float16, 64, 16, (8, 2), dict(window=4, softcap=2.0)),
    (torch.float8_e4m3fn, "mixed", torch.bfloat16, 67, 16, (4, 2), {}),
]


def _case_id(c) -> str:
    fp8, scales, qd, d, ps, (hq, hk), var = c
    extra = "".join(f"-{k}{v}" for k, v in var.items())
    return f"{FP8_IDS[fp8]}-{scales}-{str(qd)[6:]}-d{d}-ps{ps}-h{hq}x{hk}{extra}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fp8_random_forests_every_isa(isa: str, case) -> None:
    fp8, scales, qdtype, d, ps, (hq, hk), variant = case
    for seed in range(2):
        f, groups = random_forest(7400 + 10 * CASES.index(case) + seed, page_size=ps, max_len=[40, 90][seed],
                                  max_q_len=[4, 20][seed])
        _check_fp8(f.metadata(groups), f.num_pages, hq, hk, d, qdtype, fp8, scales, seed, **variant)


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=FP8_IDS.get)
def test_fp8_decode_and_extend_every_isa(isa: str, fp8: torch.dtype) -> None:
    """The benchmark's shapes, small (chunks over several token blocks, 36 / 64 packed rows), and a
    speculative extend (960 packed rows on the prompt: several row blocks; causal branches)."""
    for i, (f, groups) in enumerate((multiverse_forest(prefix=300, paths=8, path_len=70, concl_len=5),
                                     sampling_forest(prompt=260, samples=16, gen_len=20))):
        _check_fp8(f.metadata(groups), f.num_pages, 8, 2, 128, torch.bfloat16, fp8, "head", i)
    f, groups = sampling_forest(prompt=200, samples=6, gen_len=40, page_size=16)
    groups = [(n, 40) for n, _ in groups]
    _check_fp8(f.metadata(groups), f.num_pages, 8, 2, 64, torch.float16, fp8, "tensor", 2, window=50)


@pytest.mark.parametrize("d", [256, 259])
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=FP8_IDS.get)
def test_fp8_dequantization_exact_every_isa(isa: str, fp8: torch.dtype, d: int) -> None:
    """Every byte value of the format, dequantized by the kernel, equals torch's conversion times the
    scale in float32. One token, one query row: lse[h] = the score of the one key = k[h] * k_scale for
    the one-hot q of head h (sm_scale 1; non-finite K bytes replaced, they would poison every score),
    and out = v * v_scale exactly (softmax weight 1; float16 out holds every fp8 value exactly)."""
    bytes_ = torch.arange(d, dtype=torch.int64) % 256
    v8 = bytes_.to(torch.uint8).view(fp8)
    k8 = torch.where(torch.isfinite(v8.float()), v8.float(), 0).to(fp8)
    for ks, vs in ((1.0, 1.0), (0.3711, 1.0), (1.0, 3.0)):
        f = mk.KVForest(2, 1)
        root = f.new_sequence(1)
        meta = f.metadata([(root, 1)])
        kc = torch.zeros(2, 1, 1, d, dtype=fp8)
        vc = torch.zeros(2, 1, 1, d, dtype=fp8)
        page = int(meta.node_page_indices[0])
        kc[page, 0, 0] = k8
        vc[page, 0, 0] = v8
        q = torch.eye(d, dtype=torch.float16)[None]  # [1, Hq = d, d]: head h is e_h
        k_scale, v_scale = torch.tensor([ks]), torch.tensor([vs])
        out, lse = mk.tree_attention(q, kc, vc, meta, sm_scale=1.0, backend="cpu", return_lse=True,
                                     k_scale=k_scale, v_scale=v_scale)
        want_k = k8.float() * k_scale
        torch.testing.assert_close(lse[0], want_k, atol=0, rtol=0)
        want_v = (v8.float() * v_scale).to(torch.float16)  # v_scale 1: float16 holds every fp8 value
        got_v = out[0]  # [Hq, d]: every head's output is the one value row
        for h in (0, d // 2, d - 1):
            torch.testing.assert_close(got_v[h], want_v, atol=0, rtol=0, equal_nan=True)


def test_fp8_kv_bytes_one_byte_per_element_every_isa(isa: str) -> None:
    """The kernel's own load counter: 1 byte per fp8 element (a quarter of float32's count), each visible
    token once; with a window only the window's tokens."""
    from multiverse_kernels.backends import resolve

    hook = resolve("tree_attention_kv_bytes", "cpu", torch.device("cpu"))
    f, groups = multiverse_forest(prefix=333, paths=4, path_len=50, concl_len=3)
    meta = f.metadata(groups)
    for fp8 in FP8_DTYPES:
        q, kq, vq, ks, vs = fp8_inputs(meta, f.num_pages, 8, 2, 64, torch.bfloat16, fp8, "head", 0)
        assert hook(q, kq, vq, meta, 0.125, k_scale=ks, v_scale=vs) == plan_kv_tokens(meta) * 2 * 2 * 64
    root_forest = mk.KVForest(200, 16)
    root = root_forest.new_sequence(2000)
    meta = root_forest.metadata([(root, 1)])
    q, kq, vq, ks, vs = fp8_inputs(meta, root_forest.num_pages, 8, 2, 64, torch.float16, torch.float8_e5m2,
                                    "tensor", 1)
    assert hook(q, kq, vq, meta, 0.125, window=64, k_scale=ks, v_scale=vs) == 64 * 2 * 2 * 64
    assert hook(q, kq, vq, meta, 0.125, k_scale=ks, v_scale=vs) == 2000 * 2 * 2 * 64


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=FP8_IDS.get)
def test_fp8_nan_policy(isa: str, fp8: torch.dtype) -> None:
    """fp8 specials (e4m3fn NaN; e5m2 NaN and inf) follow the NaN policy as for other dtypes: a
    non-finite K token makes the rows that see it NaN, a non-finite V token makes non-finite exactly
    the output dims of the rows that see it; nothing crosses the mask (docs/errors.md)."""
    f, groups = random_forest(7450, page_size=4, max_len=30, max_q_len=4)
    meta = f.metadata(groups)
    q, kq, vq, ks, vs = fp8_inputs(meta, f.num_pages, 4, 2, 64, torch.float16, fp8, "head", 5)
    specials = [0x7F, 0xFF] if fp8 == torch.float8_e4m3fn else [0x7F, 0x7C, 0xFC]  # NaN (, +inf, -inf)
    lens = meta.node_len.tolist()
    node = max(range(meta.num_nodes), key=lambda n: (meta.vis_nodes == n).sum().item() * (lens[n] > 0))
    slots = meta.node_token_slots(node)  # the node with tokens that the most groups list
    g = torch.Generator().manual_seed(9)
    kb, vb = kq.view(torch.uint8).clone(), vq.view(torch.uint8).clone()
    kflat, vflat = kb.view(-1, 2, 64), vb.view(-1, 2, 64)
    for i, b in enumerate(specials):
        s = int(slots[torch.randint(slots.numel(), (1,), generator=g)])
        kflat[s, i % 2, 3 * i] = b
        s = int(slots[torch.randint(slots.numel(), (1,), generator=g)])
        vflat[s, (i + 1) % 2, 5 * i + 1] = b
    kq, vq = kb.view(fp8), vb.view(fp8)
    out, lse = mk.tree_attention(q, kq, vq, meta, backend="cpu", return_lse=True, k_scale=ks, v_scale=vs)
    want_o, want_l = ref_attention(q.double(), kq, vq, meta, 64 ** -0.5,
                                   variant=Variant(k_scale=ks, v_scale=vs))
    assert not bool(torch.isfinite(want_o).all()) and bool(torch.isfinite(want_o).any())
    assert torch.equal(torch.isfinite(out), torch.isfinite(want_o))
    assert torch.equal(torch.isnan(lse), torch.isnan(want_l))
    fin = torch.isfinite(want_o)
    torch.testing.assert_close(out.double()[fin], want_o[fin], **tolerance(torch.float16))


FUZZ = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(meta=forests(), heads=st.sampled_from([(1, 1), (4, 2), (4, 1), (8, 8)]),
       d=st.sampled_from([64, 128, 40]),
       qdtype=st.sampled_from([torch.float16, torch.bfloat16]), fp8=st.sampled_from(FP8_DTYPES),
       scales=st.sampled_from(["tensor", "head", "mixed"]), window=st.one_of(st.none(), st.integers(1, 30)),
       softcap=st.one_of(st.none(), st.floats(0.5, 30.0)), seed=st.integers(0, 2**16))
def test_fuzz_fp8_forests(meta, heads, d, qdtype, fp8, scales, window, softcap, seed):
    """Hypothesis-drawn forests (roots, forks, joins, own_full; tests/_strategies.py) with fp8 caches on
    the default ISA against the reference."""
    hq, hk = heads
    variant = {k: v for k, v in dict(window=window, softcap=softcap).items() if v is not None}
    _check_fp8(meta, NUM_PAGES, hq, hk, d, qdtype, fp8, scales, seed, **variant)


# ------------------------------------------------------------------------------------------ bad input
def _small():
    f, groups = random_forest(3, page_size=4)
    meta = f.metadata(groups)
    q, kq, vq, ks, vs = fp8_inputs(meta, f.num_pages, 4, 2, 64, torch.float16, torch.float8_e4m3fn, "head",
                                    0)
    plan = plan_tree_attention(meta, 4, 2, head_dim=64)
    return meta, plan, q, kq, vq, ks, vs


def test_fp8_bad_input_names_the_argument() -> None:
    """torch.ops.multiverse_C.tree_attention_run refuses malformed fp8 calls naming the argument."""
    meta, plan, q, kq, vq, ks, vs = _small()
    run = torch.ops.multiverse_C.tree_attention_run

    def call(q=q, k=kq, v=vq, **kw):
        return run(q, k, v, meta.node_page_indptr, meta.node_page_indices, plan.tensors(), plan.ints(), 0.125,
                   None, **kw)

    call(k_scale=ks, v_scale=vs)  # well-formed
    call(k_scale=ks[:1], v_scale=vs[:1])  # per tensor
    cases = [
        (dict(), "k_scale: an fp8 KV cache"),
        (dict(k_scale=ks), "v_scale: an fp8 KV cache"),
        (dict(k_scale=torch.ones(3), v_scale=vs), r"k_scale: expected shape \[1\] \(per tensor\) or \[2\]"),
        (dict(k_scale=ks.half(), v_scale=vs), "k_scale: expected float32"),
        (dict(k_scale=ks, v_scale=vs.double()), "v_scale: expected float32"),
        (dict(k_scale=ks[None], v_scale=vs), "k_scale: expected shape"),
        (dict(k_scale=ks, v_scale=vs[:1]), "v_scale: expected the shape of k_scale"),
        (dict(k_scale=ks, v_scale=vs, q=q.float()),
         "q: an fp8 KV cache .* takes float16 or bfloat16 queries"),
        (dict(k_scale=ks, v_scale=vs, v=vq.view(torch.uint8).view(torch.float8_e5m2)),
         "v_cache: expected the dtype of k_cache"),
        (dict(k_scale=ks, v_scale=vs, k=kq.half(), v=vq.half()), "k_scale: scales are for fp8 KV caches"),
        (dict(v_scale=vs, k=kq.half(), v=vq.half()), "v_scale: scales are for fp8 KV caches"),
        (dict(k_scale=ks, v_scale=vs, k=kq.float(), v=vq.float()), "k_cache: expected the dtype of q"),
    ]
    for kw, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call(**kw)


def test_fp8_backward_refused() -> None:
    """The fp8 cache is forward only: the C++ backward op refuses it naming the cache, the cpu
    backward does not declare fp8, and autograd through an fp8 forward raises NotImplementedError."""
    meta, plan, q, kq, vq, ks, vs = _small()
    assert "fp8" in cpu_backend.tree_attention.variants
    assert "fp8" not in cpu_backend.tree_attention_backward.variants
    out, lse = mk.tree_attention(q, kq, vq, meta, backend="cpu", return_lse=True, k_scale=ks, v_scale=vs)
    with pytest.raises(RuntimeError, match="k_cache: an fp8 KV cache is forward only"):
        torch.ops.multiverse_C.tree_attention_backward_run(
            torch.ones_like(out), None, q, kq, vq, out, lse, meta.node_page_indptr, meta.node_page_indices,
            plan.tensors(), plan.ints(), 0.125)
    qg = q.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="fp8"):
        mk.tree_attention(qg, kq, vq, meta, backend="cpu", k_scale=ks, v_scale=vs).sum().backward()


def test_fp8_op_errors() -> None:
    """The op (mk.tree_attention, backend="cpu") checks the variant first: MetadataError naming it."""
    meta, _, q, kq, vq, ks, vs = _small()
    with pytest.raises(MetadataError, match="k_scale"):
        mk.tree_attention(q, kq, vq, meta, backend="cpu")
    with pytest.raises(MetadataError, match="q: an fp8 KV cache"):
        mk.tree_attention(q.float(), kq, vq, meta, backend="cpu", k_scale=ks, v_scale=vs)
    with pytest.raises(MetadataError, match="v_scale"):
        mk.tree_attention(q, kq, vq, meta, backend="cpu", k_scale=ks, v_scale=torch.ones(3))
