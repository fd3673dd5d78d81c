"""The machine's roofline for one tree-attention step, measured in the same run as the kernels.

    roofline time = max(unique KV bytes / read bandwidth, step flops / GEMM rate in the step's dtype)

* **step flops** = ``4 * sum over query rows of (visible tokens) * head_dim * num_qo_heads``: S = QK^T and
  O = PV, 2 flops per multiply-add each. A row's visible tokens are the sum of its readers' limits in the
  plan (docs/plan.md), i.e. every (row, token) pair the attention must score, causal masking included.
* **read bandwidth**: ``torch.sum`` over a float32 buffer far larger than the last-level cache (bytes read
  per second; the sum writes nothing), with the thread count of the kernels it is compared with.
* **GEMM rate in the step's dtype**: ``torch.mm`` of two n x n matrices of the step's dtype (2 n^3 flops),
  same thread count: what torch's own GEMM reaches in that dtype on this machine (on CPUs with matrix
  units, AMX or AVX512-BF16, the bf16 rate is far above the fp32 one; that is the honest compute roof
  for a bf16 step whatever the kernel computes in). For a bf16/fp16 step on a CPU the roof is the faster
  of that and the fp32 GEMM (converting is always an option: without fp16 units torch's fp16 GEMM runs
  at a fraction of a GFLOP/s, far below its fp32 one); the tables name the GEMM used.
* **CPU peaks** (:func:`cpu_peaks`, printed once in the main job's header): the FMA peak of every ISA
  path the CPU runs and torch's GEMM rate in fp32, bf16 and fp16 (the matrix-unit rates), with the path
  the C++ kernel runs each dtype on.
* **FMA peak** (CPU, when the C++ extension is built): ``torch.ops.multiverse_C.cpu_fma_peak``, chains of
  fused multiply-adds held in registers on the ISA the CPU kernel dispatched to, one loop per thread.
  It is the hard compute ceiling; torch's GEMM reaches only part of it (on AMD CPUs torch's BLAS may not
  use AVX-512 at all), so a kernel can exceed 100% of the GEMM-based roofline (the long extend step
  does) but never of the FMA peak. The bench prints both shares: "% roofline" (the GEMM-based roof
  defined above) and "% FMA peak".

Both rates are timed with ``torch.utils.benchmark.Timer.blocked_autorange`` and summarised by the median,
the statistic of the bench's time column. The bench measures them at the start of every round
(:func:`paired_rounds`) and reports the median of the rounds' shares, so that a time and its roof are
taken on the same machine state. The
bandwidth side uses the dtype's own bytes.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils import benchmark

from ..backends import available_backends
from ..info import ISA_NAMES, cpu_flags, cpu_model, kernel_isa
from ..metadata import ForestMetadata
from ..planning import plan_tree_attention
from .timing import sync

__all__ = ["MachineRates", "measure_rates", "step_flops", "roofline_seconds",
           "workload_roofline", "describe_roofline", "PairedTiming", "paired_rounds", "thread_scaling",
           "describe_cpu", "fma_peak", "gemm_rate", "cpu_peaks", "describe_cpu_peaks"]


@dataclass
class MachineRates:
    """Rates measured on ``device`` with ``threads`` threads."""

    threads: int
    gemm_flops: float  # GEMM flop/s in ``dtype``
    read_bw: float  # bytes/s
    fma_flops: float | None = None  # fp32 FMA peak flop/s of the CPU kernel's ISA (None: not measured)
    dtype: torch.dtype = torch.float32  # the step's dtype
    gemm_dtype: torch.dtype | None = None  # the GEMM's dtype: the step's, or fp32 where that is faster

    def describe(self) -> str:
        fma = "" if self.fma_flops is None else \
            f", FMA peak {self.fma_flops / 1e9:.1f} GFLOP/s (cpu_fma_peak)"
        return (f"{_gemm_name(self)} {self.gemm_flops / 1e9:.1f} GFLOP/s (torch.mm), read bandwidth "
                f"{self.read_bw / 1e9:.1f} GB/s (torch.sum){fma}, {self.threads} thread(s)")


def _gemm_name(r: MachineRates) -> str:
    g = r.gemm_dtype or r.dtype
    return f"{_dt(g)} GEMM" if g == r.dtype else f"{_dt(g)} GEMM (faster than {_dt(r.dtype)}'s)"


def _dt(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float64: "fp64"}.get(dtype, str(dtype))


def measure_rates(device: str | torch.device = "cpu", gemm_n: int = 2048, bw_bytes: int = 256 << 20,
                  min_run_time: float = 0.5, dtype: torch.dtype = torch.float32) -> MachineRates:
    """Measure the GEMM rate in ``dtype`` and the read bandwidth with the current
    ``torch.get_num_threads()`` (and on the CPU the FMA peak of the kernel's ISA).

    ``bw_bytes`` should exceed the last-level cache many times (default 256 MiB).
    """
    dev = torch.device(device)
    gemm, gemm_dtype = gemm_rate(dev, dtype, gemm_n, min_run_time), dtype
    if dev.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # The compute roof of a half-precision step is the faster of torch's GEMM in its dtype (matrix
        # units: AMX, AVX512-BF16/FP16) and in fp32 (converting is always an option: on CPUs without
        # fp16 units torch's fp16 GEMM runs at a fraction of a GFLOP/s, which would make no roof at all).
        f32 = gemm_rate(dev, torch.float32, gemm_n, min_run_time)
        if f32 > gemm:
            gemm, gemm_dtype = f32, torch.float32
    nt = torch.get_num_threads()
    x = torch.ones(bw_bytes // 4, dtype=torch.float32, device=dev)
    x.sum()  # first touch
    t_rd = benchmark.Timer("x.sum(); sync(dev)", globals=dict(x=x, sync=sync, dev=dev), num_threads=nt
                           ).blocked_autorange(min_run_time=min_run_time).median
    return MachineRates(torch.get_num_threads(), gemm, x.numel() * 4 / t_rd,
                        fma_peak(min_run_time) if dev.type == "cpu" else None, dtype, gemm_dtype)


def gemm_rate(device: str | torch.device, dtype: torch.dtype, n: int = 2048,
              min_run_time: float = 0.5) -> float:
    """flop/s of ``torch.mm`` of two n x n matrices of ``dtype`` with ``torch.get_num_threads()`` threads."""
    dev = torch.device(device)
    if dev.type == "cpu" and dtype != torch.float32 and n > 256:
        # probe small first: a dtype without CPU support (fp16 GEMM on most x86) runs ~100x slower than
        # fp32, and a 2048^3 product would then take minutes
        probe = gemm_rate(dev, dtype, 256, min(min_run_time, 0.05))
        if probe < 2e9:
            return probe
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    env = dict(a=a, b=b, torch=torch, sync=sync, dev=dev)
    # Timer runs its statement with num_threads=1 unless told otherwise: pass the caller's count.
    t_mm = benchmark.Timer("torch.mm(a, b); sync(dev)", globals=env, num_threads=torch.get_num_threads()
                           ).blocked_autorange(min_run_time=min_run_time).median
    return 2 * n ** 3 / t_mm


def fma_peak(min_run_time: float = 0.5) -> float | None:
    """FMA peak flop/s of the CPU kernel's ISA with ``torch.get_num_threads()`` threads (best of a few
    runs of about ``min_run_time / 5`` s each: the ceiling, so the fastest run); None without the C++
    extension."""
    if "cpu" not in available_backends("tree_attention", "cpu"):  # loads multiverse_kernels._C
        return None
    op = torch.ops.multiverse_C.cpu_fma_peak
    iters = 1 << 16
    while True:  # size one run to ~min_run_time / 5
        t0 = time.perf_counter()
        op(iters)
        if time.perf_counter() - t0 > min_run_time / 5 or iters > 1 << 34:
            break
        iters *= 4
    return max(op(iters) for _ in range(5))


def cpu_peaks(min_run_time: float = 0.25) -> dict[str, float]:
    """The CPU's compute peaks, one entry per path (flop/s, ``torch.get_num_threads()`` threads):

    * ``fma <isa>``: :func:`fma_peak` on every ISA path of the C++ kernel this CPU runs (forced with
      ``MULTIVERSE_CPU_ISA``; the fp32 FMA rate of that build: every path but avx512_bf16 computes
      every dtype in fp32 FMAs; avx512_bf16 computes bf16 steps with bf16 dot products, twice that rate,
      and amx their products on AMX tiles);
    * ``gemm <dtype>``: torch's GEMM in fp32, bf16 and fp16 (:func:`measure_rates`): on CPUs with matrix
      units torch (oneDNN) runs bf16/fp16 on AMX tiles or AVX512-BF16 dot products, so these are the
      matrix-unit rates the honest roofline of a bf16/fp16 step uses.
    """
    out: dict[str, float] = {}
    sel, best = kernel_isa()
    if best in ISA_NAMES:
        old = os.environ.get("MULTIVERSE_CPU_ISA")
        try:
            for isa in ISA_NAMES[: ISA_NAMES.index(best) + 1]:
                os.environ["MULTIVERSE_CPU_ISA"] = isa
                peak = fma_peak(min_run_time)
                if peak:
                    out[f"fma {isa}"] = peak
        finally:
            if old is None:
                os.environ.pop("MULTIVERSE_CPU_ISA", None)
            else:
                os.environ["MULTIVERSE_CPU_ISA"] = old
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        out[f"gemm {_dt(dt)}"] = gemm_rate("cpu", dt, 1024, min_run_time)
    return out


def describe_cpu_peaks(peaks: dict[str, float]) -> str:
    """Two lines: the peaks of :func:`cpu_peaks`, and the path the C++ kernel runs each dtype on."""
    flags = cpu_flags()
    units = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("amx_fp16", "AMX-FP16"),
                                     ("avx512_bf16", "AVX512-BF16"), ("avx512_fp16", "AVX512-FP16"))
             if flag in flags]
    sel, _ = kernel_isa()
    cells = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items())
    if sel in ("amx", "amx_emulated"):
        model = " (software model of the tiles)" if sel == "amx_emulated" else ""
        half = (f"bf16 -> scores and P V by AMX tiles (tdpbf16ps){model} in tasks of >= 32 rows when "
                "d % 32 == 0, else by AVX512-BF16 dot products (vdpbf16ps); fp16 -> converted to fp32 at "
                "the load, fp32 FMAs")
    elif sel == "avx512_bf16":
        half = ("bf16 -> scores and P V by AVX512-BF16 dot products (vdpbf16ps); fp16 -> converted to fp32 "
                "at the load, fp32 FMAs")
    else:
        half = f"bf16/fp16 -> converted to fp32 at the load, {sel} fp32 FMAs"
    return (f"CPU peaks (GFLOP/s, {torch.get_num_threads()} thread(s)): {cells}; matrix units: "
            f"{', '.join(units) or 'none'}\n"
            f"cpu kernel paths: fp32 -> {sel} fp32 FMAs; {half}; "
            "compute roof of each step = torch's GEMM rate in its dtype")


def step_flops(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, head_dim: int,
               window: int | None = None) -> int:
    """4 * sum over query rows of visible tokens * head_dim * num_qo_heads (S = QK^T and O = PV); with a
    sliding ``window`` the tokens inside it (``reader_limit - reader_lo``)."""
    plan = plan_tree_attention(meta, num_qo_heads, num_kv_heads, head_dim=head_dim, window=window)
    R = plan.num_readers
    visible = int((plan.reader_limit[:R].long() - plan.reader_lo[:R].long()).sum())
    return 4 * visible * head_dim * num_qo_heads


def roofline_seconds(unique_kv_bytes: int, flops: int, rates: MachineRates) -> float:
    """max(unique KV bytes / read bandwidth, step flops / GEMM rate in the step's dtype)."""
    return max(unique_kv_bytes / rates.read_bw, flops / rates.gemm_flops)


def describe_cpu() -> str:
    """One line: CPU model, kernel ISA (and the widest supported), threads."""
    sel, best = kernel_isa()
    return (f"CPU {cpu_model()} | {os.cpu_count()} logical CPUs | cpu kernel ISA {sel} (CPU supports "
            f"{best}) | torch threads {torch.get_num_threads()}")


def workload_roofline(meta: ForestMetadata, q_shape: tuple[int, ...], num_kv_heads: int, unique_kv_bytes: int,
                      rates: MachineRates, window: int | None = None) -> tuple[float, int]:
    """(roofline seconds, step flops) of one step of the forest ``meta`` with q of shape
    [total_q, Hq, D]."""
    flops = step_flops(meta, q_shape[1], num_kv_heads, q_shape[2], window)
    return roofline_seconds(unique_kv_bytes, flops, rates), flops


def describe_roofline(unique_kv_bytes: int, flops: int, rates: MachineRates) -> str:
    """The roofline line printed above a bench table (both terms, which one binds)."""
    mem = unique_kv_bytes / rates.read_bw
    comp = flops / rates.gemm_flops
    fma = "" if rates.fma_flops is None else (
        f"; FMA peak {rates.fma_flops / 1e9:.1f} GFLOP/s: {flops / rates.fma_flops * 1e3:.3f} ms of pure "
        "FMAs")
    return (f"roofline {max(mem, comp) * 1e3:.3f} ms = max({unique_kv_bytes / 1e6:.2f} MB unique KV / "
            f"{rates.read_bw / 1e9:.1f} GB/s read, {flops / 1e9:.3f} GFLOP / {rates.gemm_flops / 1e9:.1f} "
            f"GFLOP/s {_gemm_name(rates)}) ({'compute' if comp >= mem else 'memory'}-bound, "
            f"{rates.threads} thread(s)); step flops = 4 * sum over rows of visible tokens * head_dim * "
            f"num_qo_heads{fma}")


@dataclass
class PairedTiming:
    """One method over :func:`paired_rounds`: medians over the rounds."""

    seconds: float  # median time
    roof_share: float  # median of each round's roofline seconds / time
    fma_share: float | None  # median of each round's step flops / time / FMA peak (None: not measured)


def paired_rounds(meta: ForestMetadata, q_shape: tuple[int, ...], num_kv_heads: int, unique_kv_bytes: int,
                  timers: list, device: str | torch.device = "cpu", rounds: int = 5,
                  dtype: torch.dtype = torch.float32, on_round=None,
                  window: int | None = None) -> list[PairedTiming]:
    """Time methods against the machine's roofline on the same machine state.

    Each of ``rounds`` rounds measures the GEMM, read and FMA rates (:func:`measure_rates`, short runs)
    and right after them calls every timer, in order (``timer(round_index) -> seconds``), so that both
    sides of a share, and the methods among themselves, see the same machine: on a shared VM the rates
    drift by tens of percent within a minute. Returns one :class:`PairedTiming` per timer: the median
    time and the medians of the per-round shares. Used by the main job's table (bench.run_bench) and
    by :func:`thread_scaling`."""
    times: list[list[float]] = [[] for _ in timers]
    shares: list[list[float]] = [[] for _ in timers]
    fma_shares: list[list[float]] = [[] for _ in timers]
    for i in range(max(1, rounds)):
        rates = measure_rates(device, min_run_time=0.1, dtype=dtype)
        roof, flops = workload_roofline(meta, q_shape, num_kv_heads, unique_kv_bytes, rates, window)
        for j, timer in enumerate(timers):
            t = timer(i)
            times[j].append(t)
            shares[j].append(roof / t)
            if rates.fma_flops:
                fma_shares[j].append(flops / t / rates.fma_flops)
        if on_round is not None:
            on_round(i)
    return [PairedTiming(statistics.median(t), statistics.median(s), statistics.median(f) if f else None)
            for t, s, f in zip(times, shares, fma_shares, strict=True)]


def thread_scaling(meta: ForestMetadata, q_shape: tuple[int, ...], num_kv_heads: int, unique_kv_bytes: int,
                   methods: dict[str, object], time_fn, device: str | torch.device = "cpu",
                   threads: tuple[int, ...] | None = None, rounds: int = 5,
                   dtype: torch.dtype = torch.float32) -> str:
    """Time each of ``methods`` (name -> zero-argument callable) with 1 thread and with all threads
    (``time_fn(fn) -> seconds``) in :func:`paired_rounds` (each round measures the rates, then times the
    method). Prints the medians over the rounds of the time and of each round's share. Returns the
    table."""
    all_threads = torch.get_num_threads()
    threads = threads or tuple(sorted({1, all_threads}))
    lines = [f"thread scaling, paired rounds (median of {rounds}: each round measures the rates, then times "
             "the method):",
             f"{'method':<34}{'threads':>8}{'time ms':>10}{'% roofline':>12}{'% FMA peak':>12}"
             f"{'vs 1 thread':>13}"]
    try:
        for name, fn in methods.items():
            base = None
            for nt in threads:
                torch.set_num_threads(nt)
                timer = lambda i, fn=fn: time_fn(fn)  # noqa: E731
                r = paired_rounds(meta, q_shape, num_kv_heads, unique_kv_bytes, [timer], device, rounds,
                                  dtype)[0]
                base = base or r.seconds
                fma = f"{100 * r.fma_share:11.1f}%" if r.fma_share is not None else f"{'-':>12}"
                lines.append(f"{name:<34}{nt:>8}{r.seconds * 1e3:10.3f}{100 * r.roof_share:11.1f}%{fma}"
                             f"{base / r.seconds:12.2f}x")
    finally:
        torch.set_num_threads(all_threads)
    return "\n".join(lines)
