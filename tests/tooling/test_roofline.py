"""The roofline of the main job (multiverse_kernels/bench/roofline.py): the flop count, the formula, the
rates in the step's dtype."""

from __future__ import annotations

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.bench import report, roofline, workloads
from multiverse_kernels.info import ISA_NAMES, kernel_isa
from multiverse_kernels.testing import random_forest


def test_step_flops_counts_every_visible_pair():
    for seed in range(4):
        f, groups = random_forest(900 + seed, page_size=4, max_q_len=6)
        meta = f.metadata(groups).with_own_full(seed % 2 == 0)
        visible = int(mk.dense_mask(meta).sum())  # (row, token) pairs the attention scores
        assert roofline.step_flops(meta, 8, 2, 64) == 4 * visible * 64 * 8


def test_roofline_is_the_larger_term():
    r = roofline.MachineRates(threads=1, gemm_flops=100e9, read_bw=10e9)
    assert roofline.roofline_seconds(10**9, 10**9, r) == 0.1  # memory-bound
    assert roofline.roofline_seconds(10**6, 10**11, r) == 1.0  # compute-bound


def test_bench_forests_flops_and_extend_shape():
    f, groups = workloads.build_forest("extend")
    assert groups == [(g, 16) for g, _ in groups] and len(groups) == 8
    w = workloads.make_workload("multiverse", "cpu", torch.float32, hq=4, hk=1, d=8)
    # 8 paths see 4096 + 512 tokens, the conclusion 4096 + 8 * 512 + 32
    assert roofline.step_flops(w.meta, 4, 1, 8) == 4 * (8 * 4608 + 8224) * 8 * 4


def test_measure_rates_and_header():
    r = roofline.measure_rates("cpu", gemm_n=128, bw_bytes=8 << 20, min_run_time=0.01)
    assert r.gemm_flops > 0 and r.read_bw > 0 and r.threads == torch.get_num_threads()
    assert r.dtype == torch.float32 and "fp32 GEMM" in r.describe()
    rb = roofline.measure_rates("cpu", gemm_n=128, bw_bytes=8 << 20, min_run_time=0.01, dtype=torch.bfloat16)
    assert rb.dtype == torch.bfloat16 and rb.gemm_flops > 0
    # the compute roof is the faster of the bf16 GEMM and the fp32 GEMM (bf16 inputs can be widened): the
    # header names the one it used (on a CPU without bf16 matrix units the fp32 GEMM wins)
    assert rb.gemm_dtype in (torch.bfloat16, torch.float32)
    want = "bf16 GEMM" if rb.gemm_dtype == torch.bfloat16 else "fp32 GEMM (faster than bf16's)"
    assert want in rb.describe() and want in roofline.describe_roofline(10**6, 10**9, rb)
    line = roofline.describe_cpu()
    assert "ISA" in line and "threads" in line


@pytest.mark.parametrize("bf16_rate", [1e9, 1e12])
def test_half_precision_roof_takes_the_faster_gemm(monkeypatch, bf16_rate):
    """Both ways the comparison can go, whatever this CPU does: the roof is the faster GEMM, and the
    header says which dtype it was measured in."""
    monkeypatch.setattr(roofline, "gemm_rate",
                        lambda dev, dt, n, t: bf16_rate if dt == torch.bfloat16 else 1e11)
    rb = roofline.measure_rates("cpu", gemm_n=16, bw_bytes=1 << 20, min_run_time=0.001, dtype=torch.bfloat16)
    assert rb.gemm_flops == max(bf16_rate, 1e11)
    if bf16_rate > 1e11:
        assert rb.gemm_dtype == torch.bfloat16
        assert "bf16 GEMM" in rb.describe() and "faster" not in rb.describe()
    else:
        assert rb.gemm_dtype == torch.float32 and "fp32 GEMM (faster than bf16's)" in rb.describe()


def test_rates_are_timed_with_the_callers_thread_count(monkeypatch):
    """torch.utils.benchmark.Timer runs with 1 thread unless told: the rates must use the caller's count
    (a 1-thread GEMM rate made every multi-thread roofline share twice too high)."""
    seen = []
    real = roofline.benchmark.Timer

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_threads", 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(roofline.benchmark, "Timer", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        roofline.measure_rates("cpu", gemm_n=64, bw_bytes=1 << 20, min_run_time=0.01)
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2]


def test_fma_peak_is_a_ceiling_on_every_isa(monkeypatch):
    """The FMA probe runs on the ISA the kernel dispatches to (every ISA this CPU runs), reports a rate,
    and the bench table prints the share of it next to the GEMM-based roofline."""
    from multiverse_kernels.testing import import_cpu_backend_or_skip

    import_cpu_backend_or_skip()
    sel, best = kernel_isa()
    for isa in ISA_NAMES[:ISA_NAMES.index(best) + 1]:
        monkeypatch.setenv("MULTIVERSE_CPU_ISA", isa)
        peak = roofline.fma_peak(min_run_time=0.02)
        assert peak is not None and peak > 1e8, (isa, peak)
    r = roofline.MachineRates(threads=1, gemm_flops=100e9, read_bw=10e9, fma_flops=200e9)
    assert "FMA peak 200.0 GFLOP/s" in r.describe()
    assert "ms of pure FMAs" in roofline.describe_roofline(10**6, 10**9, r)
    w = workloads.make_workload("multiverse", "cpu", torch.float32, hq=4, hk=1, d=8)
    flops = roofline.step_flops(w.meta, 4, 1, 8)
    rows = [report.Row("tree_attention[cpu]", 0.01, w.unique_kv_bytes, roof_share=0.5,
                       fma_share=flops / 200e9 / 0.01)]
    table = report.format_table(w, rows, 1e10)
    assert "% FMA peak" in table and f"{100 * flops / 200e9 / 0.01:.1f}%" in table and "50.0%" in table
