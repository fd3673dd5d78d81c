"""How much of a CPU step's KV loading hides behind its arithmetic, same process.

For each step (the main job's forests by name, or ``single``: one unshared sequence, the sampling
forest with one sample, as ``benchmarks/vllm_cpu_peer.py`` runs it) this times the cpu backend's call
three ways and reports medians over alternating rounds:

* **DRAM**: the step as the main job times it (the caches flushed before each call, so the KV comes
  from memory);
* **compute only**: the same call with every node's page list pointed at page 0 - the same
  instructions, loop trip counts and in-page row offsets, but the whole step's KV is one page of K and
  V (128 KiB at the main job's shapes in fp32: in L2), and the caches are not flushed: the arithmetic,
  the cache hits and the prefetch instructions alone;
* **read**: the step's unique KV bytes at the machine's read bandwidth measured in the same run
  (``measure_rates``: ``torch.sum`` over 256 MiB with the same thread count) - the memory time of a
  perfect streamer.

and ``overlap = (compute + read - DRAM) / min(compute, read)``: 1 when the shorter of the two hides
entirely behind the longer (the step takes max(compute, read)), 0 when they add up (loads and
arithmetic serialised), below 0 when the step is slower even than the two in series (docs/performance.md,
"how much of a step's loading hides behind its arithmetic", has runs with the machine named). Variant
forests (``window``, ``fp8``) run with their variant. Command (from the repository root)::

    python benchmarks/load_overlap.py                                # single, Multiverse, sampling16; fp32
    python benchmarks/load_overlap.py --forests single --threads 1 --dtypes fp32,bf16 --json out.json

A plain script, not a ``test_*.py`` file: pytest does not collect it (benchmarks/conftest.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

from multiverse_kernels import tree_attention
from multiverse_kernels.bench.roofline import measure_rates
from multiverse_kernels.bench.timing import time_fn
from multiverse_kernels.bench.workloads import (
    BENCH_FORESTS,
    SINGLE,
    Workload,
    make_workload,
    single_sequence_workload,
)
from multiverse_kernels.info import cpu_model, kernel_isa

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_step(name: str, dtype: torch.dtype, page_size: int, prompt: int) -> Workload:
    """The main job's step ``name``, or ``single``: one sequence of ``prompt`` + 256 tokens, one row."""
    if name == SINGLE:
        return single_sequence_workload("cpu", dtype, page_size, prompt)
    return make_workload(name, "cpu", dtype, page_size=page_size)


def compute_only(w: Workload) -> Workload:
    """``w`` with every node's pages replaced by page 0 (same shapes, lengths, visibility and rows)."""
    meta = dataclasses.replace(w.meta, node_page_indices=torch.zeros_like(w.meta.node_page_indices))
    return dataclasses.replace(w, meta=meta)


def overlap(dram_s: float, compute_s: float, read_s: float) -> float:
    """(compute + read - DRAM) / min(compute, read): 1 fully overlapped, 0 serialised."""
    return (compute_s + read_s - dram_s) / min(compute_s, read_s)


def measure(w: Workload, read_bw: float, rounds: int, iters: int) -> dict:
    """DRAM and compute-only medians (seconds) of the cpu backend on ``w``, the read time, the overlap."""
    c = compute_only(w)

    def call(x: Workload):
        return lambda: tree_attention(x.q, x.k_cache, x.v_cache, x.meta, backend="cpu", validate=False,
                                      **x.variant)

    fns = {"dram": (call(w), True), "compute": (call(c), False)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):  # interleaved, the order alternating
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            fn, flush = fns[k]
            times[k].append(time_fn(fn, "cpu", iters, warmup=1, flush=flush))
    dram, comp = statistics.median(times["dram"]), statistics.median(times["compute"])
    read = w.unique_kv_bytes / read_bw
    return {"dram_ms": dram * 1e3, "compute_only_ms": comp * 1e3, "read_ms": read * 1e3,
            "overlap": overlap(dram, comp, read), "unique_kv_mb": w.unique_kv_bytes / 1e6,
            "kv_gbs": w.unique_kv_bytes / dram / 1e9,
            "dram_round_ms": [t * 1e3 for t in times["dram"]],
            "compute_round_ms": [t * 1e3 for t in times["compute"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forests", default=f"{SINGLE},multiverse,sampling16",
                    help=f"comma-separated: {SINGLE} or the main job's ({', '.join(BENCH_FORESTS)})")
    ap.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16, fp16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads >= 1 (default: torch's)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=None,
                    help=f"the {SINGLE} sequence's prompt tokens (default 4096; only with --forests "
                         f"{SINGLE})")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5, help="calls per round")
    ap.add_argument("--json", default=None, help="also write the records here")
    a = ap.parse_args(argv)
    forests = [f for f in a.forests.split(",") if f]
    for f in forests:
        if f != SINGLE and f not in BENCH_FORESTS:
            known = ", ".join(BENCH_FORESTS)
            ap.error(f"--forests: unknown forest {f!r} (expected {SINGLE} or one of {known})")
    if a.prompt is not None and (forests != [SINGLE] or a.prompt < 1):
        ap.error(f"--prompt: a positive token count, and only with --forests {SINGLE} (the main job's "
                 f"forests have fixed prompts), got {a.prompt} with --forests {a.forests}")
    for flag in ("threads", "page_size", "rounds", "iters"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            ap.error(f"--{flag.replace('_', '-')}: expected >= 1, got {value}")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    dts = [d for d in a.dtypes.split(",") if d]
    for d in dts:
        if d not in DTYPES:
            ap.error(f"--dtypes: unknown dtype {d!r} (expected one of {', '.join(DTYPES)})")
    rates = measure_rates("cpu")
    nt = torch.get_num_threads()
    cmd = " ".join(["python benchmarks/load_overlap.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"## KV loads vs arithmetic ({cpu_model()}, {nt} thread(s), cpu kernel ISA {kernel_isa()[0]}; read "
          f"bandwidth {rates.read_bw / 1e9:.1f} GB/s (torch.sum); `{cmd}`)\n")
    print("| step | dtype | DRAM ms | compute only ms | read ms (at the read bandwidth) | overlap "
          "| KV GB/s |")
    print("|---|---|---|---|---|---|---|")
    recs = []
    for name in forests:
        for d in dts:
            w = make_step(name, DTYPES[d], a.page_size, a.prompt or 4096)
            label = {v: k for k, v in DTYPES.items()}.get(w.q.dtype, str(w.q.dtype))  # fp8: bf16 queries
            if w.k_cache.element_size() == 1:
                label += " (fp8 KV)"
            rec = {"forest": name, "dtype": label, "threads": nt, "page_size": a.page_size,
                   "read_bw_gbs": rates.read_bw / 1e9, **measure(w, rates.read_bw, a.rounds, a.iters)}
            recs.append(rec)
            print(f"| {name} | {label} | {rec['dram_ms']:.2f} | {rec['compute_only_ms']:.2f} "
                  f"| {rec['read_ms']:.2f} | {rec['overlap']:.2f} | {rec['kv_gbs']:.1f} |", flush=True)
    print("\noverlap = (compute only + read - DRAM) / min(compute only, read): 1 = the shorter hidden "
          "behind the longer, 0 = they add up. compute only: every node's pages pointed at page 0 "
          "(same instructions, KV in cache).")
    if a.json:
        with open(a.json, "w") as fh:
            doc = {"cpu": cpu_model(), "isa": kernel_isa()[0], "command": cmd, "records": recs}
            json.dump(doc, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
