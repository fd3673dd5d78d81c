"""CUDA backend (multiverse_kernels._C_cuda): what only it has (its kv-byte counter, a CUDA-graph capture
of its run step) and its attention variants (sliding window, soft-cap: both kernels against the float64
reference on random forests, caller plans, long windowed prefills, the wide tile, soft-cap saturation, the
NaN policy through the cap, and the load counter showing the window's skipped tokens; fp8 KV caches,
e4m3fn / e5m2 with per-tensor / per-KV-head scales, alone and with window and soft-cap, on both kernels:
random forests, caller plans, the wide tile, misaligned caches, every byte value, fp8 NaN / Inf, the load
counter's 1 byte per element, bad scales). Its comparisons
with the reference on random forests are the ``cuda`` cases of tests/ops/test_<op>.py
(test_tree_attention.py, test_tree_attention_backward.py, test_merge_states.py, test_append_paged_kv.py,
test_variants.py).

Needs a CUDA GPU and the built CUDA extension; elsewhere every test is SKIPPED with the reason (never
reported as passed). Run them on a GPU machine with ``python -m multiverse_kernels.gpu_run`` (docs/gpu.md).
Outputs are poisoned with NaN (the ``poisoned`` fixture).
"""

from __future__ import annotations

import pytest
import torch
from _fp8 import fp8_inputs

from multiverse_kernels import KVForest
from multiverse_kernels.ops import tree_attention
from multiverse_kernels.planning import PlanCapacity, plan_kv_tokens, plan_tree_attention
from multiverse_kernels.testing import (
    NO_GPU_REASON,
    assert_close_to_reference,
    compact_pages,
    lse_tolerance,
    make_inputs,
    random_forest,
    sampling_forest,
    tolerance,
)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned")]

if not torch.cuda.is_available():
    pytest.skip(NO_GPU_REASON,
                allow_module_level=True)
try:
    from multiverse_kernels.backends import cuda as cuda_backend  # noqa: F401
except (ImportError, OSError, RuntimeError) as e:
    pytest.skip(f"CUDA extension not built ({e}); see docs/build.md", allow_module_level=True)

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_bytes_hook(dtype):
    from multiverse_kernels.backends import resolve

    hook = resolve("tree_attention_kv_bytes", "cuda", torch.device(DEV))
    f, groups = sampling_forest(prompt=1000, samples=16, gen_len=9)
    meta = f.metadata(groups).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, 32, 8, 128, dtype, device=DEV)
    counted = hook(q, k, v, meta, 0.1)
    if dtype != torch.float32:  # tensor-core kernel: each chunk's K/V loaded once for its <= 64 rows
        assert counted == plan_kv_tokens(meta) * 2 * 8 * 128 * k.element_size()
    else:  # scalar kernel (counted at its loads): every packed row reads the tokens it sees
        from multiverse_kernels.backends.cuda import _run_plan

        p = _run_plan(q, k, meta)[1]
        vis = 0
        for w in range(p.num_items):
            kv0, ln = int(p.item_kv_start[w]), int(p.item_kv_len[w])
            r0, nr = int(p.item_reader_start[w]), int(p.item_num_readers[w])
            vis += sum(min(max(int(p.reader_limit[r]) - kv0, 0), ln) for r in range(r0, r0 + nr))
        assert counted == 32 * vis * 2 * 128 * k.element_size()


def test_cuda_graph_capture_and_replay():
    """The run step (attention + merge over padded plan buffers) is capturable; a replay after new
    q values are copied in gives the result of a fresh call."""
    from multiverse_kernels.backends.cpu._ext import run_tree_attention

    hq, hk, d = 32, 8, 128
    f, groups = sampling_forest(prompt=500, samples=8, gen_len=5)
    meta = f.metadata(groups).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, hq, hk, d, torch.float16, device=DEV)
    plan = plan_tree_attention(meta, hq, hk, head_dim=d, capacity=PlanCapacity(4096, 4096, 4096, 64))
    run_tree_attention(q, k, v, meta, d ** -0.5, plan)  # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = run_tree_attention(q, k, v, meta, d ** -0.5, plan)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    ref, ref_lse = tree_attention(q, k, v, meta, backend="cuda", return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


# --------------------------------------------------------------------------- variants: window, soft-cap
# Both kernels: the tensor-core one (fp16/bf16 x head_dim 64/128/256) and the SIMT one (fp32, and the odd
# head_dim 80 in every dtype). GQA 4 and 1, page sizes 1 and 16, random forests (joins, empty and
# one-token nodes, extends; compact_pages: a small cache pool instead of the builders' 4,096 pages).
HEAD_DIMS = (64, 128, 256, 80)
VARIANT_CASES = [dict(window=1), dict(window=7), dict(softcap=2.5), dict(window=9, softcap=5.0)]


def _variant_id(v: dict) -> str:
    return "+".join(f"{a}{b}" for a, b in v.items())


def check_variant(meta, num_pages: int, hq: int, hk: int, d: int, dtype: torch.dtype, seed: int, *,
                  plan: dict | None = None, q_scale: float = 1.0, **variant):
    """``backend="cuda"`` (outputs poisoned) with ``variant`` against the float64 reference on the same
    rounded inputs; ``plan``: keyword arguments of ``plan_tree_attention`` (a caller's plan, built with the
    call's window). Returns the cuda (out, lse)."""
    q, k, v = make_inputs(meta, num_pages, hq, hk, d, dtype, seed=seed)
    q = (q.float() * q_scale).to(dtype)
    want, want_lse = tree_attention(q.double(), k.double(), v.double(), meta, backend="reference",
                                    return_lse=True, **variant)
    m = meta.to(DEV)
    p = None
    if plan is not None:
        p = plan_tree_attention(m, hq, hk, head_dim=d, window=variant.get("window"), **plan)
    got, lse = tree_attention(q.to(DEV), k.to(DEV), v.to(DEV), m, backend="cuda", return_lse=True, plan=p,
                              **variant)
    torch.cuda.synchronize()
    assert_close_to_reference("out", got, want, like=q, **tolerance(dtype))
    assert_close_to_reference("lse", lse, want_lse, **lse_tolerance(dtype))
    return got, lse


@pytest.mark.parametrize("variant", VARIANT_CASES, ids=_variant_id)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_softcap_random_forests(variant, d, dtype):
    for seed, (page_size, hq, hk) in enumerate([(1, 8, 2), (16, 4, 4)]):
        f, groups = random_forest(7300 + seed, page_size=page_size, max_len=[40, 100][seed],
                                  max_q_len=[4, 20][seed])
        check_variant(*compact_pages(f.metadata(groups)), hq, hk, d, dtype, seed, **variant)


# (chunk_tokens, rows_per_tile): one-token chunks, chunks split inside a window, one to three readers per
# item (partials merged), a tile larger than the readers
PLAN_CASES = [(1, 1), (5, 2), (16, 3), (64, 100)]


@pytest.mark.parametrize(("chunk", "rpt"), PLAN_CASES)
@pytest.mark.parametrize(("dtype", "d"), [(torch.float16, 128), (torch.bfloat16, 64), (torch.float32, 64)],
                         ids=str)
def test_window_softcap_caller_plans(chunk, rpt, dtype, d):
    f, groups = random_forest(7400 + chunk, page_size=4, max_len=40, max_q_len=6)
    check_variant(*compact_pages(f.metadata(groups)), 8, 2, d, dtype, chunk,
                  plan=dict(chunk_tokens=chunk, rows_per_tile=rpt), window=6, softcap=3.0)


@pytest.mark.parametrize(("dtype", "d"), [(torch.float16, 64), (torch.bfloat16, 128), (torch.float16, 256),
                                          (torch.float32, 128)], ids=str)
def test_window_long_prefill_and_wide_tile(dtype, d):
    """A 300-token causal prefill (GQA 4: 1,200 packed rows -> several items of up to 128 or 256 packed
    rows, run in passes of the 128-row tile at head_dim 64/128: the readers of one tile start their
    windows at different tokens) with a 60-token window and a soft-cap; and 40 decode rows (160 packed
    rows: the wide tile) over a 400-token prefix whose window starts inside it."""
    f = KVForest(64, 16)
    root = f.new_sequence(0)
    f.append(root, 300)
    check_variant(f.metadata([(root, 300)]), f.num_pages, 8, 2, d, dtype, 11, window=60, softcap=8.0)
    f, groups = sampling_forest(prompt=400, samples=40, gen_len=30, page_size=16)
    check_variant(f.metadata(groups), f.num_pages, 8, 2, d, dtype, 12, window=45)


@pytest.mark.parametrize(("dtype", "d"), [(torch.float16, 128), (torch.bfloat16, 256), (torch.float32, 64),
                                          (torch.float16, 80)], ids=str)
def test_softcap_saturates(dtype, d):
    """Scores far beyond the cap (q x 30: |sm_scale q.k| ~ 30 >> c = 1): the capped scores sit in the
    tanh's tails (+-c), where the kernels' exp2-based tanh must saturate like torch.tanh."""
    f, groups = random_forest(7500, page_size=4, max_len=30, max_q_len=4)
    check_variant(*compact_pages(f.metadata(groups)), 4, 2, d, dtype, 5, q_scale=30.0, softcap=1.0)


@pytest.mark.parametrize(("dtype", "d"), [(torch.float16, 128), (torch.float32, 64)], ids=str)
@pytest.mark.parametrize("value", (float("nan"), float("inf")))
def test_softcap_nan_policy(dtype, d, value):
    """NaN policy through the soft-cap (docs/errors.md, the reference): a NaN or +-Inf raw score that a
    row sees makes that (row, head) NaN, out and lse (the tanh would have mapped an infinite score to
    +-c); rows that do not see the token are finite and equal to the clean run."""
    f = KVForest(64, 4)
    root = f.new_sequence(20)
    a, b = f.fork(root, 2)
    f.append(a, 6)
    f.append(b, 5)
    meta = f.metadata([(a, 2), (b, 1)])
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, d, dtype, seed=3)
    slot = int(meta.node_token_slots(a)[1])  # token 1 of path a: only a's rows see it
    k_bad = k.clone()
    k_bad.view(-1, 2, d)[slot, 0, 7] = value  # KV head 0: query heads 0 and 1
    m = meta.to(DEV)
    kw = dict(softcap=2.0)
    qd, vd = q.to(DEV), v.to(DEV)
    clean, clean_lse = tree_attention(qd, k.to(DEV), vd, m, backend="cuda", return_lse=True, **kw)
    got, lse = tree_attention(qd, k_bad.to(DEV), vd, m, backend="cuda", return_lse=True, **kw)
    want, want_lse = tree_attention(q.double(), k_bad.double(), v.double(), meta, backend="reference",
                                    return_lse=True, **kw)
    got, lse, clean, clean_lse = (t.cpu() for t in (got, lse, clean, clean_lse))
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isnan(lse), torch.isnan(want_lse))
    assert bool(torch.isnan(want_lse[:2, :2]).all()) and not bool(torch.isnan(want_lse[2:]).any())
    fine = ~torch.isnan(want).any(-1)
    torch.testing.assert_close(got[fine].float(), clean[fine].float(), atol=0, rtol=0)
    torch.testing.assert_close(lse[fine], clean_lse[fine], atol=0, rtol=0)


def _mma_loaded_tokens(plan, group: int, d: int) -> int:
    """K/V tokens per KV head the tensor-core kernel loads for ``plan``: each item's packed rows (reader x
    GQA head) run in tiles of 64 (128 when the plan's items may hold more than 64 and d <= 128), and a
    tile loads its chunk from its rows' smallest first visible token (reader_lo) to their largest limit."""
    tile = 128 if d <= 128 and plan.rows_per_tile * group > 64 else 64
    total = 0
    for w in range(plan.num_items):
        kv0, ln = int(plan.item_kv_start[w]), int(plan.item_kv_len[w])
        r0, nr = int(plan.item_reader_start[w]), int(plan.item_num_readers[w])
        for m0 in range(0, nr * group, tile):
            spans = []
            for r in sorted({r0 + m // group for m in range(m0, min(nr * group, m0 + tile))}):
                vis = min(max(int(plan.reader_limit[r]) - kv0, 0), ln)
                lo = max(int(plan.reader_lo[r]) - kv0, 0)
                if lo < vis:
                    spans.append((lo, vis))
            if spans:
                total += max(v for _, v in spans) - min(lo for lo, _ in spans)
    return total


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_loads_only_the_window(dtype):
    """The kernels' own load counter with a window: a decode row over a 2,000-token prefix with a
    64-token window loads its last 64 tokens, not the prefix (the tensor-core kernel once per KV head, the
    SIMT kernel once per packed row); 16 decode rows over a 1,000-token prefix with a 100-token window load
    what the plan's tiles see from their smallest first visible token, far less than without the window."""
    from multiverse_kernels.backends import resolve
    from multiverse_kernels.backends.cuda import _run_plan

    hook = resolve("tree_attention_kv_bytes", "cuda", torch.device(DEV))
    hq, hk, d = 8, 2, 128
    per_token = 2 * d * torch.finfo(dtype).bits // 8  # K + V of one head
    heads = hk if dtype != torch.float32 else hq  # the SIMT kernel (fp32) loads per packed row
    f = KVForest(200, 16)
    root = f.new_sequence(2000)
    meta = f.metadata([(root, 1)]).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, hq, hk, d, dtype, device=DEV)
    assert hook(q, k, v, meta, 0.1, window=64) == 64 * heads * per_token
    assert hook(q, k, v, meta, 0.1) == 2000 * heads * per_token
    f, groups = sampling_forest(prompt=1000, samples=16, gen_len=9)
    meta = f.metadata(groups).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, hq, hk, d, dtype, device=DEV)
    counted = hook(q, k, v, meta, 0.1, window=100)
    if dtype != torch.float32:
        plan = _run_plan(q, k, meta, 100)[1]
        assert counted == _mma_loaded_tokens(plan, hq // hk, d) * hk * per_token
        assert 4 * counted < hook(q, k, v, meta, 0.1)  # 91 + 16 x 9 tokens vs the 1,000-token prompt
    else:
        # every row (a sample's last token) sees the last 100 positions: 91 prompt tokens and its own 9
        assert counted == 16 * 100 * hq * per_token


# ------------------------------------------------------------------------------------- variant: fp8 KV
# fp8 caches (float8_e4m3fn / float8_e5m2) on both kernels: the tensor-core one (fp16 / bf16 q x head_dim
# 64/128/256: fp8 bytes streamed by cp.async into a staging area, converted to q's dtype per KV block) and
# the SIMT one (the odd head_dim 80; misaligned caches), per-tensor and per-KV-head scales, against the
# float64 reference (which dequantizes at the load: float(k8) * k_scale) on the same fp8 bytes.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_IDS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
QDTYPES = (torch.float16, torch.bfloat16)


def check_fp8(meta, num_pages: int, hq: int, hk: int, d: int, qdtype: torch.dtype, fp8: torch.dtype,
              scales: str, seed: int, *, plan: dict | None = None, **variant):
    """``backend="cuda"`` (outputs poisoned) with fp8 caches against the float64 reference on the same
    fp8 bytes and scales; ``plan``: keyword arguments of ``plan_tree_attention`` (a caller's plan)."""
    from multiverse_kernels.backends.reference import tree_attention as ref_attention
    from multiverse_kernels.variants import Variant

    q, kq, vq, ks, vs = fp8_inputs(meta, num_pages, hq, hk, d, qdtype, fp8, scales, seed)
    sm = d ** -0.5
    want, want_lse = ref_attention(q.double(), kq, vq, meta, sm, variant=Variant(k_scale=ks, v_scale=vs,
                                                                                    **variant))
    m = meta.to(DEV)
    p = None
    if plan is not None:
        p = plan_tree_attention(m, hq, hk, head_dim=d, window=variant.get("window"), **plan)
    got, lse = tree_attention(q.to(DEV), kq.to(DEV), vq.to(DEV), m, sm_scale=sm, backend="cuda",
                              return_lse=True, plan=p, k_scale=ks.to(DEV), v_scale=vs.to(DEV), **variant)
    assert got.dtype == qdtype and lse.dtype == torch.float32
    assert_close_to_reference("out", got.cpu(), want, like=q, **tolerance(qdtype))
    assert_close_to_reference("lse", lse.cpu(), want_lse, **lse_tolerance(qdtype))


def test_fp8_declared():
    """The backend declares fp8 (so backend="auto" may pick it for an fp8 cache on a GPU)."""
    assert "fp8" in cuda_backend.tree_attention.variants


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=FP8_IDS.get)
def test_fp8_random_forests(fp8, d, qdtype):
    """Random forests (joins, empty and one-token nodes, extends): page size 1 with GQA 4 and per-tensor
    scales, page size 16 without GQA and per-KV-head scales, page size 4 with GQA 2 and mixed scales."""
    for seed, (page_size, hq, hk, scales) in enumerate([(1, 8, 2, "tensor"), (16, 4, 4, "head"),
                                                        (4, 6, 3, "mixed")]):
        f, groups = random_forest(7600 + seed, page_size=page_size, max_len=[40, 100, 60][seed],
                                  max_q_len=[4, 20, 8][seed])
        check_fp8(*compact_pages(f.metadata(groups)), hq, hk, d, qdtype, fp8, scales, seed)


@pytest.mark.parametrize("variant", VARIANT_CASES, ids=_variant_id)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=FP8_IDS.get)
def test_fp8_window_softcap(fp8, d, variant):
    """fp8 caches combined with the window and the soft-cap (the VAR x fp8 kernels)."""
    for seed, (page_size, hq, hk, scales, qdtype) in enumerate([(1, 8, 2, "head", torch.bfloat16),
                                                                (16, 4, 4, "tensor", torch.float16)]):
        f, groups = random_forest(7700 + seed, page_size=page_size, max_len=[40, 100][seed],
                                  max_q_len=[4, 20][seed])
        check_fp8(*compact_pages(f.metadata(groups)), hq, hk, d, qdtype, fp8, scales, seed, **variant)


@pytest.mark.parametrize(("chunk", "rpt"), PLAN_CASES)
@pytest.mark.parametrize(("fp8", "qdtype", "d"), [(torch.float8_e4m3fn, torch.float16, 128),
                                                  (torch.float8_e5m2, torch.bfloat16, 64),
                                                  (torch.float8_e4m3fn, torch.bfloat16, 80)], ids=str)
def test_fp8_caller_plans(chunk, rpt, fp8, qdtype, d):
    """Caller plans: one-token chunks, chunks split inside a window, partial states merged."""
    f, groups = random_forest(7800 + chunk, page_size=4, max_len=40, max_q_len=6)
    check_fp8(*compact_pages(f.metadata(groups)), 8, 2, d, qdtype, fp8, "head", chunk,
              plan=dict(chunk_tokens=chunk, rows_per_tile=rpt), window=6, softcap=3.0)
    check_fp8(*compact_pages(f.metadata(groups)), 8, 2, d, qdtype, fp8, "tensor", chunk + 1,
              plan=dict(chunk_tokens=chunk, rows_per_tile=rpt))


@pytest.mark.parametrize(("fp8", "qdtype", "d"), [(torch.float8_e4m3fn, torch.float16, 64),
                                                  (torch.float8_e5m2, torch.bfloat16, 128),
                                                  (torch.float8_e4m3fn, torch.bfloat16, 256)], ids=str)
def test_fp8_long_prefill_and_wide_tile(fp8, qdtype, d):
    """A 300-token causal prefill (1,200 packed rows: several KV blocks per chunk, several row tiles,
    chunks of several blocks through the staging double buffer) with a window and a soft-cap, the plain
    prefill, and 40 decode rows (160 packed rows: the wide tile at head_dim 64/128) over a 400-token
    prefix."""
    f = KVForest(64, 16)
    root = f.new_sequence(0)
    f.append(root, 300)
    meta = f.metadata([(root, 300)])
    check_fp8(meta, f.num_pages, 8, 2, d, qdtype, fp8, "head", 21, window=60, softcap=8.0)
    check_fp8(meta, f.num_pages, 8, 2, d, qdtype, fp8, "tensor", 22)
    f, groups = sampling_forest(prompt=400, samples=40, gen_len=30, page_size=16)
    check_fp8(f.metadata(groups), f.num_pages, 8, 2, d, qdtype, fp8, "head", 23)


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=FP8_IDS.get)
def test_fp8_misaligned_caches_take_the_simt_kernel(fp8):
    """fp8 caches whose head stride is not a multiple of 16 bytes (a view of a wider cache) run the SIMT
    kernel (warned once) and still equal the reference."""
    from multiverse_kernels.backends.reference import tree_attention as ref_attention
    from multiverse_kernels.variants import Variant

    f, groups = random_forest(7900, page_size=4, max_len=40, max_q_len=6)
    meta, n = compact_pages(f.metadata(groups))
    q, kq, vq, ks, vs = fp8_inputs(meta, n, 8, 2, 128, torch.float16, fp8, "head", 3)
    wide_k = torch.zeros(*kq.shape[:3], 136, dtype=fp8)
    wide_v = torch.zeros(*vq.shape[:3], 136, dtype=fp8)
    wide_k[..., :128] = kq
    wide_v[..., :128] = vq
    kd, vd = wide_k.to(DEV)[..., :128], wide_v.to(DEV)[..., :128]  # head stride 136 bytes
    cuda_backend._WARNED.discard("misaligned")
    with pytest.warns(UserWarning, match="scalar kernel"):
        got, lse = tree_attention(q.to(DEV), kd, vd, meta.to(DEV), backend="cuda", return_lse=True,
                                  k_scale=ks.to(DEV), v_scale=vs.to(DEV), window=9)
    want, want_lse = ref_attention(q.double(), kq, vq, meta, 128 ** -0.5,
                                   variant=Variant(k_scale=ks, v_scale=vs, window=9))
    assert_close_to_reference("out", got.cpu(), want, like=q, **tolerance(torch.float16))
    assert_close_to_reference("lse", lse.cpu(), want_lse, **lse_tolerance(torch.float16))


@pytest.mark.parametrize("qdtype", QDTYPES, ids=str)
@pytest.mark.parametrize("d", [256, 80])
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=FP8_IDS.get)
def test_fp8_dequantization_exact(fp8, d, qdtype):
    """Every byte value of the format (head_dim 256: the tensor-core kernel's conversion; 80: the SIMT
    kernel's, the first 80 bytes) dequantized by the kernel. One token, one query row, one-hot q of head h
    (sm_scale 1): lse[h] = k8[h] * k_scale (the kernels fold the scale into the score scale: a few float32
    roundings, rtol 1e-6; non-finite K bytes replaced, they would poison every score), and out = v8 *
    v_scale exactly for v_scale 1 (softmax weight 1; float16 and bfloat16 hold every fp8 value, Inf and
    NaN included)."""
    bytes_ = torch.arange(d, dtype=torch.int64) % 256
    v8 = bytes_.to(torch.uint8).view(fp8)
    k8 = torch.where(torch.isfinite(v8.float()), v8.float(), 0).to(fp8)
    for ks, vs in ((1.0, 1.0), (0.3711, 1.0), (1.0, 3.0)):
        f = KVForest(2, 1)
        root = f.new_sequence(1)
        meta = f.metadata([(root, 1)])
        kc = torch.zeros(2, 1, 1, d, dtype=fp8)
        vc = torch.zeros(2, 1, 1, d, dtype=fp8)
        page = int(meta.node_page_indices[0])
        kc[page, 0, 0] = k8
        vc[page, 0, 0] = v8
        q = torch.eye(d, dtype=qdtype)[None]  # [1, Hq = d, d]: head h is e_h
        k_scale, v_scale = torch.tensor([ks]), torch.tensor([vs])
        out, lse = tree_attention(q.to(DEV), kc.to(DEV), vc.to(DEV), meta.to(DEV), sm_scale=1.0,
                                  backend="cuda", return_lse=True, k_scale=k_scale.to(DEV),
                                  v_scale=v_scale.to(DEV))
        out, lse = out.cpu(), lse.cpu()
        torch.testing.assert_close(lse[0], k8.float() * k_scale, atol=0, rtol=1e-6)
        want_v = v8.float() * v_scale
        if vs == 1.0:  # exact
            for h in (0, d // 2, d - 1):
                torch.testing.assert_close(out[0, h], want_v.to(qdtype), atol=0, rtol=0, equal_nan=True)
        else:  # v_scale folded into 1 / l: one float32 rounding, then q's dtype
            for h in (0, d - 1):
                torch.testing.assert_close(out[0, h].float(), want_v.to(qdtype).float(), equal_nan=True,
                                           **tolerance(qdtype))


@pytest.mark.parametrize("d", [128, 80])
def test_fp8_kv_bytes_one_byte_per_element(d):
    """The kernels' own load counter: 1 byte per fp8 element (half the float16 count) — the tensor-core
    kernel each chunk's K/V once per KV head, the SIMT kernel (head_dim 80) once per packed row; with a
    window only the window's tokens."""
    from multiverse_kernels.backends import resolve

    hook = resolve("tree_attention_kv_bytes", "cuda", torch.device(DEV))
    hq, hk = 8, 2
    heads = hk if d != 80 else hq
    f, groups = sampling_forest(prompt=333, samples=4, gen_len=9)
    meta = f.metadata(groups).to(DEV)
    for fp8 in FP8_DTYPES:
        q, kq, vq, ks, vs = (t.to(DEV) for t in fp8_inputs(meta, f.num_pages, hq, hk, d, torch.bfloat16, fp8,
                                                           "head", 0))
        counted = hook(q, kq, vq, meta, 0.125, k_scale=ks, v_scale=vs)
        assert counted == hook(q, kq.to(torch.bfloat16), vq.to(torch.bfloat16), meta, 0.125) // 2
        if d != 80:
            assert counted == plan_kv_tokens(meta) * 2 * hk * d
    f = KVForest(200, 16)
    root = f.new_sequence(2000)
    meta = f.metadata([(root, 1)]).to(DEV)
    q, kq, vq, ks, vs = (t.to(DEV) for t in fp8_inputs(meta, f.num_pages, hq, hk, d, torch.float16,
                                                       torch.float8_e5m2, "tensor", 1))
    assert hook(q, kq, vq, meta, 0.125, window=64, k_scale=ks, v_scale=vs) == 64 * heads * 2 * d
    assert hook(q, kq, vq, meta, 0.125, k_scale=ks, v_scale=vs) == 2000 * heads * 2 * d


@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=FP8_IDS.get)
def test_fp8_nan_policy(fp8, d):
    """fp8 specials (e4m3fn NaN; e5m2 NaN and +-Inf) in K follow the NaN policy (docs/errors.md): the
    (row, head) pairs that see the token are NaN / non-finite exactly where the reference's are, the
    others finite. In V: the SIMT kernel (head_dim 80) matches the reference exactly; the tensor-core
    kernel makes non-finite at least the reference's non-finite elements (a non-finite V token of a KV
    block that a row masks reaches it as 0 x Inf in P V: the documented gap of docs/build.md)."""
    from multiverse_kernels.backends.reference import tree_attention as ref_attention
    from multiverse_kernels.variants import Variant

    f, groups = random_forest(7450, page_size=4, max_len=30, max_q_len=4)
    meta, n = compact_pages(f.metadata(groups))
    q, kq, vq, ks, vs = fp8_inputs(meta, n, 4, 2, d, torch.float16, fp8, "head", 5)
    specials = [0x7F, 0xFF] if fp8 == torch.float8_e4m3fn else [0x7F, 0x7C, 0xFC]  # NaN (, +inf, -inf)
    lens = meta.node_len.tolist()
    node = max(range(meta.num_nodes), key=lambda nd: (meta.vis_nodes == nd).sum().item() * (lens[nd] > 0))
    slots = meta.node_token_slots(node)  # the node with tokens that the most groups list
    g = torch.Generator().manual_seed(9)
    for which in ("k", "v"):
        kb, vb = kq.view(torch.uint8).clone(), vq.view(torch.uint8).clone()
        flat = (kb if which == "k" else vb).view(-1, 2, d)
        for i, b in enumerate(specials):
            s = int(slots[torch.randint(slots.numel(), (1,), generator=g)])
            flat[s, i % 2, 3 * i + 1] = b
        k_bad, v_bad = kb.view(fp8), vb.view(fp8)
        got, lse = tree_attention(q.to(DEV), k_bad.to(DEV), v_bad.to(DEV), meta.to(DEV), backend="cuda",
                                  return_lse=True, k_scale=ks.to(DEV), v_scale=vs.to(DEV))
        got, lse = got.cpu(), lse.cpu()
        want, want_lse = ref_attention(q.double(), k_bad, v_bad, meta, d ** -0.5,
                                       variant=Variant(k_scale=ks, v_scale=vs))
        assert not bool(torch.isfinite(want).all()) and bool(torch.isfinite(want).any())
        if which == "k" or d == 80:
            assert torch.equal(torch.isfinite(got), torch.isfinite(want)), which
        else:
            assert bool((~torch.isfinite(got))[~torch.isfinite(want)].all()), which
        assert torch.equal(torch.isnan(lse), torch.isnan(want_lse)), which
        fin = torch.isfinite(want) & torch.isfinite(got)
        torch.testing.assert_close(got.double()[fin], want[fin], **tolerance(torch.float16))


def test_fp8_bad_scales_name_the_argument():
    """torch.ops.multiverse_C.tree_attention_run (CUDA key) refuses malformed fp8 calls naming the argument
    (the shared make_attention_params checks)."""
    f, groups = random_forest(3, page_size=4)
    meta = f.metadata(groups)
    q, kq, vq, ks, vs = (t.to(DEV) for t in fp8_inputs(meta, f.num_pages, 4, 2, 64, torch.float16,
                                                       torch.float8_e4m3fn, "head", 0))
    meta = meta.to(DEV)
    plan = plan_tree_attention(meta, 4, 2, head_dim=64)
    run = torch.ops.multiverse_C.tree_attention_run

    def call(q=q, k=kq, v=vq, **kw):
        return run(q, k, v, meta.node_page_indptr, meta.node_page_indices, plan.tensors(), plan.ints(), 0.125,
                   None, **kw)

    call(k_scale=ks, v_scale=vs)  # well-formed
    cases = [
        (dict(), "k_scale: an fp8 KV cache"),
        (dict(k_scale=ks), "v_scale: an fp8 KV cache"),
        (dict(k_scale=torch.ones(3, device=DEV), v_scale=vs), r"k_scale: expected shape \[1\]"),
        (dict(k_scale=ks.half(), v_scale=vs), "k_scale: expected float32"),
        (dict(k_scale=ks, v_scale=vs.cpu()), "v_scale: expected device"),
        (dict(k_scale=ks, v_scale=vs[:1]), "v_scale: expected the shape of k_scale"),
        (dict(k_scale=ks, v_scale=vs, q=q.float()), "q: an fp8 KV cache .* takes float16 or bfloat16"),
        (dict(k_scale=ks, v_scale=vs, v=vq.view(torch.uint8).view(torch.float8_e5m2)),
         "v_cache: expected the dtype of k_cache"),
        (dict(k_scale=ks, v_scale=vs, k=kq.half(), v=vq.half()), "k_scale: scales are for fp8 KV caches"),
    ]
    for kw, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call(**kw)
