"""Every micro-kernel build of the C++ CPU tree attention this machine can run, forward and backward,
against the reference.

The forward and backward kernels are compiled for AMX (bf16 products by tdpbf16ps tiles; also on a software
model of the tiles: amx_emulated), AVX-512 with AVX512-BF16 (bf16 products by vdpbf16ps), AVX-512,
AVX2+FMA+F16C and the baseline target (csrc/cpu/kernels_*.cpp) and picked by one dispatch
(csrc/cpu/isa_dispatch.cpp: cpuid, capped by MULTIVERSE_CPU_ISA) for both passes. Each test runs once per ISA;
an ISA this CPU cannot run is skipped with the reason (so an AVX2 machine reports the AVX-512 cases as
skipped, not passed). Forward shapes are chosen to cross every tiling boundary of the kernel: row blocks of
128 packed rows, token blocks of 48 (24 for tasks of at most 16 rows), register tiles (16/32 rows x 6/12
tokens, 6/12 rows x 16/32 dims), head dims that are not multiples of the vector width (fp32 V is then packed,
not read in place), causal extends, many readers, tiny chunks. Backward shapes cross its sub-chunks of 256
tokens, row blocks of 32 packed rows and head dims padded to 16.
"""

from __future__ import annotations

import pytest
import torch

from multiverse_kernels.forest import KVForest
from multiverse_kernels.metadata import ForestMetadata
from multiverse_kernels.ops import tree_attention
from multiverse_kernels.planning import invariant_plan, plan_kv_tokens
from multiverse_kernels.testing import (
    check_tree_attention,
    check_tree_attention_backward,
    import_cpu_backend_or_skip,
    make_inputs,
    multiverse_forest,
    random_forest,
    sampling_forest,
)

cpu_backend = import_cpu_backend_or_skip()

from _cpu_isa import supported_isa  # noqa: E402

from multiverse_kernels.backends.cpu._ext import run_tree_attention_backward  # noqa: E402
from multiverse_kernels.info import ISA_NAMES, isa_runnable  # noqa: E402 (after the skip)
from multiverse_kernels.info import kernel_isa as cpu_isa  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]





def _check(meta: ForestMetadata, num_pages: int, hq: int, hk: int, d: int, dtype: torch.dtype, seed: int,
           plan: dict | None = None) -> None:
    """The one compare-to-reference helper (outputs poisoned) on the forced ISA's kernels."""
    check_tree_attention("cpu", meta, num_pages, hq, hk, d, dtype, seed=seed, plan=plan)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_forests_every_isa(isa: str, seed: int, dtype: torch.dtype) -> None:
    hq, hk, d = [(8, 2, 64), (6, 3, 80), (4, 4, 128), (8, 1, 40)][seed]
    f, groups = random_forest(7000 + seed, page_size=[1, 4, 16, 16][seed], max_len=[24, 120, 60, 200][seed],
                              max_q_len=[4, 30, 8, 3][seed])
    _check(f.metadata(groups), f.num_pages, hq, hk, d, dtype, seed)


@pytest.mark.parametrize("page_size", [3, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_page_sizes_not_powers_of_two_every_isa(isa: str, page_size: int, dtype: torch.dtype) -> None:
    """The kernel finds a row's page by a shift for power-of-two page sizes and by a division otherwise
    (csrc/include/multiverse/index_math.h paged_offset): the division path, with light (few rows) and heavy
    tasks, chunks crossing pages, and the next task's prefetched rows."""
    f, groups = random_forest(7300 + page_size, page_size=page_size, max_len=90, max_q_len=6)
    _check(f.metadata(groups), f.num_pages, 8, 2, 64, dtype, page_size)
    f, groups = multiverse_forest(prefix=100, paths=6, path_len=29, concl_len=4, page_size=page_size,
                                  concl_q=2)
    _check(f.metadata(groups), f.num_pages, 8, 2, 64, dtype, page_size + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_forests_every_isa(isa: str, dtype: torch.dtype) -> None:
    """The benchmark's shapes, small: 36 / 64 / 4-8 packed rows, chunks over several token blocks."""
    for f, groups in (multiverse_forest(prefix=300, paths=8, path_len=70, concl_len=5),
                      sampling_forest(prompt=260, samples=16, gen_len=20)):
        _check(f.metadata(groups), f.num_pages, 32 // 4, 2, 128, dtype, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extend_many_rows_every_isa(isa: str, dtype: torch.dtype) -> None:
    """Speculative verification: 6 branches x 40 draft tokens over a 200-token prompt (GQA 4: 960
    packed rows on the prompt -> several row blocks; causal triangles in the branches)."""
    f, groups = sampling_forest(prompt=200, samples=6, gen_len=40, page_size=16)
    groups = [(n, 40) for n, _ in groups]
    _check(f.metadata(groups), f.num_pages, 8, 2, 64, dtype, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [16, 24, 33, 72, 256])
def test_head_dims_every_isa(isa: str, d: int, dtype: torch.dtype) -> None:
    """Head dims off the vector widths; an odd one too (the bf16 dot products read head dims in pairs)."""
    f, groups = multiverse_forest(prefix=100, paths=3, path_len=30, concl_len=3, page_size=4, concl_q=2)
    _check(f.metadata(groups), f.num_pages, 4, 2, d, dtype, d)


@pytest.mark.parametrize("path", ["avx2", "avx512", "avx512_bf16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tasks_of_several_kv_heads_match_one_head_tasks(monkeypatch, dtype: torch.dtype, path: str) -> None:
    """The avx2 and AVX-512 paths run a step whose items are all light (at most 16 packed rows) as tasks
    of several KV heads (task_heads; csrc/cpu/tree_attention.cpp heads_per_task), and a step with a heavier
    item as one-head tasks (run_task, which runs its light items as one-head run_heads). A lone sequence's
    rows are bitwise the same computed alone (heads per task: 8 at one thread, 4 at two) and next to a
    10-way sampling group (whose prompt item has 20 packed rows), and agree with the reference."""
    if supported_isa() < ISA_NAMES.index(path):
        pytest.skip(f"this CPU runs at most {ISA_NAMES[supported_isa()]}: no {path} path here")
    monkeypatch.setenv("MULTIVERSE_CPU_ISA", path)
    hq, hk, d = 16, 8, 64
    f = KVForest(64, page_size=16)
    lone = f.new_sequence(300)
    kids = f.fork(f.new_sequence(100), 10)
    for kid in kids:
        f.append(kid, 5)
    groups = [(lone, 1)] + [(kid, 1) for kid in kids]
    meta_all, meta_lone = f.metadata(groups), f.metadata(groups[:1])
    q, k, v = make_inputs(meta_all, f.num_pages, hq, hk, d, dtype, seed=11)
    plan = lambda m: invariant_plan(m, hq, hk, head_dim=d, chunk_tokens=96, rows_per_tile=64)  # noqa: E731
    out_all = tree_attention(q, k, v, meta_all, backend="cpu", plan=plan(meta_all))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = tree_attention(q[:1], k, v, meta_lone, backend="cpu", plan=plan(meta_lone))
            assert torch.equal(out, out_all[:1]), f"{n} thread(s): the lone sequence's rows differ"
    finally:
        torch.set_num_threads(threads)
    ref = tree_attention(q, k, v, meta_all, backend="reference")
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out_all.float(), ref.float(), rtol=tol, atol=tol)


def test_bf16_dot_path_runs_where_the_cpu_has_it(monkeypatch) -> None:
    """On a CPU with AVX512-BF16 the avx512_bf16 path computes bf16 scores with vdpbf16ps (other fp32
    summation order than the avx512 path's FMAs): its lse bits differ from the avx512 path's on the same
    single-threaded step, and both agree with the reference (check_tree_attention above)."""
    if supported_isa() < ISA_NAMES.index("avx512_bf16"):
        pytest.skip(f"this CPU runs at most {ISA_NAMES[supported_isa()]}: no avx512_bf16 path here")
    f, groups = multiverse_forest(prefix=200, paths=4, path_len=40, concl_len=3, page_size=16)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 8, 2, 128, torch.bfloat16, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lse = {}
        for name in ("avx512", "avx512_bf16"):
            monkeypatch.setenv("MULTIVERSE_CPU_ISA", name)
            lse[name] = tree_attention(q, k, v, meta, backend="cpu", return_lse=True)[1]
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(lse["avx512"], lse["avx512_bf16"]), "MULTIVERSE_CPU_ISA=avx512 changed nothing"
    torch.testing.assert_close(lse["avx512"], lse["avx512_bf16"], rtol=1e-5, atol=1e-5)


def test_amx_tiles_run_where_asked(monkeypatch) -> None:
    """The AMX path's score tiles run: on its software model (amx_emulated: each instruction's products
    summed before they join the accumulator) the lse bits of a step with row tiles of 32 rows differ from
    the vdpbf16ps path's, and agree with them to fp32 rounding; on a CPU with AMX the hardware's tiles
    agree with the model the same way (the model is what the layout tests above check)."""
    if supported_isa() < ISA_NAMES.index("avx512_bf16"):
        pytest.skip(f"this CPU runs at most {ISA_NAMES[supported_isa()]}: the AMX model needs avx512_bf16")
    f, groups = multiverse_forest(prefix=200, paths=10, path_len=40, concl_len=3, page_size=16)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 8, 2, 128, torch.bfloat16, seed=5)
    names = ["avx512_bf16", "amx_emulated"] + (["amx"] if supported_isa() >= ISA_NAMES.index("amx") else [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lse = {}
        for name in names:
            monkeypatch.setenv("MULTIVERSE_CPU_ISA", name)
            lse[name] = tree_attention(q, k, v, meta, backend="cpu", return_lse=True)[1]
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(lse["avx512_bf16"], lse["amx_emulated"]), "amx_emulated ran no AMX tile"
    for name in names[1:]:
        torch.testing.assert_close(lse[name], lse["avx512_bf16"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk,tile", [(1, 1), (7, 2), (100, 3)])
def test_user_plans_every_isa(isa: str, chunk: int, tile: int) -> None:
    f, groups = random_forest(7100 + chunk, page_size=4, max_len=150, max_q_len=12)
    meta = f.metadata(groups)
    _check(meta, f.num_pages, 8, 2, 64, torch.bfloat16, chunk,
           plan=dict(chunk_tokens=chunk, rows_per_tile=tile))


def test_kv_bytes_counted_at_loads_every_isa(isa: str) -> None:
    """The kernel's own load counter (incremented where it reads the caches) = unique visible KV."""
    from multiverse_kernels.backends import resolve

    hook = resolve("tree_attention_kv_bytes", "cpu", torch.device("cpu"))
    for dtype in DTYPES:
        f, groups = multiverse_forest(prefix=333, paths=4, path_len=50, concl_len=3)
        meta = f.metadata(groups)
        q, k, v = make_inputs(meta, f.num_pages, 8, 2, 64, dtype)
        assert hook(q, k, v, meta, 0.125) == plan_kv_tokens(meta) * 2 * 2 * 64 * k.element_size()


# ---------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_random_forests_every_isa(isa: str, seed: int, dtype: torch.dtype) -> None:
    """dq, dk, dv of the forced ISA's backward kernels against the float64 reference backward."""
    hq, hk, d = [(8, 2, 64), (6, 3, 40), (4, 1, 72)][seed]
    f, groups = random_forest(7200 + seed, page_size=[1, 4, 16][seed], max_len=[60, 120, 40][seed],
                              max_q_len=[4, 12, 8][seed])
    check_tree_attention_backward("cpu", f.metadata(groups), f.num_pages, hq, hk, d, dtype, seed=seed,
                                  with_lse=seed != 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_long_chunks_many_rows_every_isa(isa: str, dtype: torch.dtype) -> None:
    """A 600-token prefix in one chunk (3 sub-chunks of 256 tokens) read by 9 readers x GQA 4 = 36 packed
    rows (2 row blocks of 32), and causal branches of 40 rows each."""
    f, groups = multiverse_forest(prefix=600, paths=8, path_len=70, concl_len=5)
    check_tree_attention_backward("cpu", f.metadata(groups), f.num_pages, 8, 2, 128, dtype, seed=3,
                                  plan=dict(chunk_tokens=1024))
    f, groups = sampling_forest(prompt=200, samples=3, gen_len=40, page_size=16)
    groups = [(n, 40) for n, _ in groups]
    check_tree_attention_backward("cpu", f.metadata(groups), f.num_pages, 8, 2, 64, dtype, seed=4)


def _backward_bits(seed: int = 5) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv of one fixed backward on one thread (the accumulation order is then fixed)."""
    f, groups = multiverse_forest(prefix=100, paths=3, path_len=30, concl_len=3, page_size=4)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 8, 2, 64, torch.float32, seed=seed)
    out, lse = tree_attention(q, k, v, meta, return_lse=True, backend="reference")
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    from multiverse_kernels.planning import plan_tree_attention

    plan = plan_tree_attention(meta, 8, 2, head_dim=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tuple(run_tree_attention_backward(go, None, q, k, v, out, lse, meta, 0.125, plan))
    finally:
        torch.set_num_threads(threads)


def test_bf16_backward_dot_path_runs_where_the_cpu_has_it(monkeypatch) -> None:
    """The backward's bf16 products by vdpbf16ps (P and dS rounded to bf16, FlashAttention-2 style): on
    a CPU with AVX512-BF16 its dq/dk/dv bits differ from the avx512 path's (fp32 FMAs) on the same
    single-threaded backward; both agree with the float64 reference (the tests above), and with each
    other within bf16 rounding. Every dtype but bf16 keeps the fp32 products (fp32 bits equal)."""
    if supported_isa() < ISA_NAMES.index("avx512_bf16"):
        pytest.skip(f"this CPU runs at most {ISA_NAMES[supported_isa()]}: no avx512_bf16 path here")
    f, groups = multiverse_forest(prefix=300, paths=3, path_len=40, concl_len=3, page_size=16)
    meta = f.metadata(groups)
    from multiverse_kernels.planning import plan_tree_attention

    plan = plan_tree_attention(meta, 8, 2, head_dim=64)
    grads = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v = make_inputs(meta, f.num_pages, 8, 2, 64, dtype, seed=6)
            out, lse = tree_attention(q, k, v, meta, return_lse=True, backend="reference")
            go = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
            for name in ("avx512", "avx512_bf16"):
                monkeypatch.setenv("MULTIVERSE_CPU_ISA", name)
                grads[name, dtype] = run_tree_attention_backward(go, None, q, k, v, out.to(dtype), lse, meta,
                                                                 0.125, plan)
    finally:
        torch.set_num_threads(threads)
    a, b = grads["avx512", torch.bfloat16], grads["avx512_bf16", torch.bfloat16]
    assert not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), \
        "the bf16 backward gave the avx512 path's bits on avx512_bf16: the dot path did not run"
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.float(), y.float(), rtol=3e-2, atol=3e-2)
    f32 = grads["avx512", torch.float32], grads["avx512_bf16", torch.float32]
    assert all(torch.equal(x, y) for x, y in zip(*f32, strict=True))


def test_bf16_backward_amx_tiles_run_where_asked(monkeypatch) -> None:
    """The bf16 backward's products on AMX tiles: on the tiles' software model (amx_emulated) dq/dk/dv
    bits differ from the vdpbf16ps path's (each tile instruction's products summed first) and agree with
    them to fp32 rounding of the sums (same bf16 operands); on an AMX CPU the hardware agrees with the
    model the same way. The float64 reference checks every path above."""
    if supported_isa() < ISA_NAMES.index("avx512_bf16"):
        pytest.skip(f"this CPU runs at most {ISA_NAMES[supported_isa()]}: the AMX model needs avx512_bf16")
    f, groups = multiverse_forest(prefix=300, paths=5, path_len=40, concl_len=3, page_size=16)
    meta = f.metadata(groups)
    from multiverse_kernels.planning import plan_tree_attention

    plan = plan_tree_attention(meta, 8, 2, head_dim=80)
    names = ["avx512_bf16", "amx_emulated"] + (["amx"] if supported_isa() >= ISA_NAMES.index("amx") else [])
    grads = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, k, v = make_inputs(meta, f.num_pages, 8, 2, 80, torch.bfloat16, seed=7)
        out, lse = tree_attention(q, k, v, meta, return_lse=True, backend="reference")
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
        for name in names:
            monkeypatch.setenv("MULTIVERSE_CPU_ISA", name)
            grads[name] = run_tree_attention_backward(go, None, q, k, v, out, lse, meta, 0.125, plan)
    finally:
        torch.set_num_threads(threads)
    dot, model = grads["avx512_bf16"], grads["amx_emulated"]
    assert not all(torch.equal(x, y) for x, y in zip(dot, model, strict=True)), \
        "amx_emulated gave the vdpbf16ps path's bits: the backward's tiles did not run"
    for name in names[1:]:
        for x, y in zip(grads["avx512_bf16"], grads[name], strict=True):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-3, atol=1e-3)


def test_forced_isa_caps_the_backward(monkeypatch) -> None:
    """MULTIVERSE_CPU_ISA selects the backward's kernels too (one dispatch): an unknown name fails the
    backward naming the variable, an ISA above the CPU's fails it with "at most", and the baseline
    kernels (no FMA) give other float32 bits than the widest ISA's (FMA) on the same single-threaded
    backward, while a repeat on the same ISA gives the same bits."""
    _, best = cpu_isa()
    widest = _backward_bits()
    assert all(torch.equal(a, b) for a, b in zip(widest, _backward_bits(), strict=True))
    monkeypatch.setenv("MULTIVERSE_CPU_ISA", "sse9")
    with pytest.raises((RuntimeError, ValueError), match="MULTIVERSE_CPU_ISA"):
        _backward_bits()
    beyond = _isas_beyond(best)
    if beyond:
        monkeypatch.setenv("MULTIVERSE_CPU_ISA", beyond[0])
        with pytest.raises((RuntimeError, ValueError), match="at most"):
            _backward_bits()
    if best != "baseline":
        monkeypatch.setenv("MULTIVERSE_CPU_ISA", "baseline")
        assert cpu_isa() == ("baseline", best)
        base = _backward_bits()
        assert not all(torch.equal(a, b) for a, b in zip(widest, base, strict=True)), \
            "MULTIVERSE_CPU_ISA=baseline did not change the backward's kernels"
        for a, b in zip(widest, base, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _isas_beyond(best: str) -> list[str]:
    """The ISA names this CPU cannot run (above its widest; amx_emulated where it lacks avx512_bf16; none on
    an AMX CPU, where amx_emulated runs too)."""
    return [n for n in ISA_NAMES[ISA_NAMES.index(best) + 1:] if not isa_runnable(n, best)]


def test_forced_isa_errors_name_the_variable(monkeypatch) -> None:
    f, groups = random_forest(3)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages)
    monkeypatch.setenv("MULTIVERSE_CPU_ISA", "sse9")
    with pytest.raises((RuntimeError, ValueError), match="MULTIVERSE_CPU_ISA"):
        tree_attention(q, k, v, meta, backend="cpu")
    best = supported_isa()
    for name in _isas_beyond(ISA_NAMES[best]):  # more than the CPU has: an error, not a silent fallback
        monkeypatch.setenv("MULTIVERSE_CPU_ISA", name)
        with pytest.raises((RuntimeError, ValueError), match="at most"):
            tree_attention(q, k, v, meta, backend="cpu")
    monkeypatch.delenv("MULTIVERSE_CPU_ISA")
    assert cpu_isa() == (ISA_NAMES[best], ISA_NAMES[best])


# --------------------------------------------------------------------------- variants: window, soft-cap
def check_variant_grads(meta: ForestMetadata, num_pages: int, hq: int, hk: int, d: int, dtype: torch.dtype,
                        seed: int, backward: bool = True, **variant) -> None:
    """cpu forward (out, lse) and backward (dq, dk, dv through autograd, loss on out and lse) against
    the reference with the same ``window`` / ``softcap``; the reference runs in float64 on the same
    (rounded) inputs, the cpu kernels in ``dtype``."""
    from multiverse_kernels.testing import tolerance

    q, k, v = make_inputs(meta, num_pages, hq, hk, d, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(q.shape, generator=g)
    gl = torch.randn(q.shape[:2], generator=g)
    res = {}
    for backend, dt in (("cpu", dtype), ("reference", torch.float64)):
        ins = [t.detach().to(dt).clone().requires_grad_(backward) for t in (q, k, v)]
        out, lse = tree_attention(*ins, meta, backend=backend, return_lse=True, **variant)
        res[backend] = [out.detach().double(), lse.detach().double()]
        if backward:
            ((out.double() * go.double()).sum() + (lse.double() * gl.double()).sum()).backward()
            res[backend] += [t.grad.double() for t in ins]
    tol = tolerance(dtype)
    scale = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 2}[dtype]  # grads sum many terms
    for i, (got, want) in enumerate(zip(res["cpu"], res["reference"], strict=True)):
        t = tol if i < 2 else dict(atol=tol["atol"] * 5 * scale, rtol=tol["rtol"] * 5 * scale)
        torch.testing.assert_close(got, want, **t, msg=lambda m, i=i: f"output {i}: {m}")


VARIANT_CASES = [dict(window=1), dict(softcap=2.5), dict(window=9, softcap=5.0)]
# The default run takes the combined case (a window and a soft-cap in one step) on every ISA; the single
# variants (a one-token window, a soft-cap alone) run under `slow` (about 80 s of the default run on a
# 2-core AVX-512 CPU, where all six ISA paths run).
_VARIANT_PARAMS = [pytest.param(v, marks=[] if len(v) > 1 else pytest.mark.slow,
                                id="+".join(f"{a}{b}" for a, b in v.items())) for v in VARIANT_CASES]


@pytest.mark.parametrize("variant", _VARIANT_PARAMS)
# (fp16 under `slow`: its kernels are the fp32 ones after the load's conversion, which the fp16 cases of
# the tests above run by default; the sweep's gradients are the default run's costliest cases)
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.slow),
                                   torch.bfloat16], ids=str)
def test_window_softcap_random_forests_every_isa(isa: str, variant: dict, dtype: torch.dtype) -> None:
    for seed, (page_size, (hq, hk, d)) in enumerate([(1, (8, 2, 64)), (16, (4, 4, 128))]):
        f, groups = random_forest(7300 + seed, page_size=page_size, max_len=[40, 100][seed],
                                  max_q_len=[4, 20][seed])
        check_variant_grads(f.metadata(groups), f.num_pages, hq, hk, d, dtype, seed, **variant)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_long_prefill_every_isa(isa: str, dtype: torch.dtype) -> None:
    """A 300-token causal prefill (GQA 4: 1,200 packed rows -> several items, row blocks and backward
    sub-chunks) with a 60-token window and a soft-cap; and decode rows over a 400-token prefix whose
    window starts inside it (the chunks below are neither planned nor loaded)."""
    from multiverse_kernels import KVForest

    f = KVForest(64, 16)
    root = f.new_sequence(0)
    f.append(root, 300)
    check_variant_grads(f.metadata([(root, 300)]), f.num_pages, 8, 2, 64, dtype, 11, window=60, softcap=8.0)
    f, groups = sampling_forest(prompt=400, samples=5, gen_len=30, page_size=16)
    check_variant_grads(f.metadata(groups), f.num_pages, 8, 2, 128, dtype, 12, window=45)


def test_window_loads_only_the_window_every_isa(isa: str) -> None:
    """The kernel's own load counter with a window: a decode row over a 2,000-token prefix with a
    64-token window loads its last 64 tokens, not the prefix."""
    from multiverse_kernels import KVForest
    from multiverse_kernels.backends import resolve

    hook = resolve("tree_attention_kv_bytes", "cpu", torch.device("cpu"))
    f = KVForest(200, 16)
    root = f.new_sequence(2000)
    meta = f.metadata([(root, 1)])
    q, k, v = make_inputs(meta, f.num_pages, 8, 2, 64, torch.float32)
    assert hook(q, k, v, meta, 0.125, window=64) == 64 * 2 * 2 * 64 * 4
    assert hook(q, k, v, meta, 0.125) == 2000 * 2 * 2 * 64 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_nan_in_v_stays_out_every_isa(isa: str, dtype: torch.dtype) -> None:
    """NaN policy (docs/errors.md) on each path: a NaN in the V row of a token only some rows of a tile
    see (the last token of each branch in a causal extend: its last query row only) reaches exactly the
    rows that see it. The bf16 path takes two tokens per instruction where every row of a tile sees both;
    such a masked token must be taken alone, never as 0 x NaN."""
    f, groups = sampling_forest(prompt=70, samples=3, gen_len=30, page_size=16)
    groups = [(n, 9) for n, _ in groups]
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 8, 2, 64, dtype, seed=3)
    clean = tree_attention(q, k, v, meta, backend="cpu")
    v = v.clone()
    for n, _ in groups:  # the last token of every branch
        slot = int(meta.node_token_slots(n)[-1])
        v.view(-1, 2, 64)[slot, 0, 5] = float("nan")
    out = tree_attention(q, k, v, meta, backend="cpu")
    last = torch.tensor([qo - 1 for qo in meta.qo_indptr.tolist()[1:]])
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[last] = False
    assert bool(torch.isnan(out[last][:, :4, 5]).all())  # query heads 0-3 read KV head 0
    assert bool(torch.isfinite(out[others]).all())
    torch.testing.assert_close(out[others], clean[others], atol=0, rtol=0)
