"""CUDA backend (multiverse_kernels._C_cuda): what only it has (its kv-byte counter, a CUDA-graph capture
of its run step) and its attention variants (sliding window, soft-cap: both kernels against the float64
reference on random forests, caller plans, long windowed prefills, the wide tile, soft-cap saturation, the
NaN policy through the cap, and the load counter showing the window's skipped tokens). Its comparisons
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
