"""Cold vs. warm steps of ``tree_attention[cpu]``: how much of a step is the kernel's compute and how
much is waiting for memory (issue 25, item 3: memory-bound steps at >= 70% of read bandwidth).

    python -m benchmarks.cold_warm                          # bf16, 3 rounds
    python -m benchmarks.cold_warm --dtype float32 --rounds 5

For a 4,096-token prompt read by 1, 4 and 9 decode rows (``bench.workloads.sweep_workload``: 32 q / 8
KV heads, head_dim 128, page size 16; 4, 16 and 36 packed rows per KV head), 8 branches of 512 tokens
over a 64-token prompt (tasks of 4 rows) and the main job's two decode forests, each step is timed

- **cold**: as the main job times it (``bench.timing.time_fn``: a 128 MiB read before every call, so the
  step's K/V come from DRAM), and
- **warm**: back to back (``flush=False``: the step's K/V stay in the caches when they fit: the L3 of
  most server CPUs holds the 4K-prompt steps' 17-34 MB only partly, so "warm" is the kernel's speed
  from L2/L3 rather than pure compute).

Each is the minimum over ``--rounds`` of the median of its calls; the unique K+V bytes over the cold time
is the step's useful read rate. The gap between the two columns is the memory time the kernel does not
hide behind its compute. One process, the installed (or ``PYTHONPATH``) build.
"""

from __future__ import annotations

import argparse

import torch

from multiverse_kernels import tree_attention
from multiverse_kernels.bench.roofline import describe_cpu
from multiverse_kernels.bench.timing import copy_bandwidth, time_fn
from multiverse_kernels.bench.workloads import BENCH_FORESTS, Workload, make_workload, sweep_workload


def workloads(dtype: torch.dtype) -> list[tuple[str, Workload]]:
    """The steps timed: one prompt at 1 / 4 / 9 readers, short branches, the main job's decode forests."""
    out = [(f"prompt 4096, {r} reader(s)", sweep_workload(4096, r, 1, "cpu", dtype)) for r in (1, 4, 9)]
    out.append(("prompt 64, 8 x 512 branches", sweep_workload(64, 8, 512, "cpu", dtype)))
    out += [(name, make_workload(name, "cpu", dtype)) for name in list(BENCH_FORESTS)[:2]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=9)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth("cpu")
    print(f"{describe_cpu()} | copy bandwidth {bw / 1e9:.1f} GB/s | {args.dtype} | "
          f"python -m benchmarks.cold_warm --dtype {args.dtype} --rounds {args.rounds}\n")
    print("| step | cold ms | warm ms | cold / warm | unique KV MB | cold GB/s | % copy BW |")
    print("|---|---|---|---|---|---|---|")
    for name, w in workloads(dtype):
        def step(w: Workload = w) -> torch.Tensor:
            return tree_attention(w.q, w.k_cache, w.v_cache, w.meta, backend="cpu", validate=False,
                                  **w.variant)

        cold = min(time_fn(step, "cpu", iters=args.iters) for _ in range(args.rounds))
        warm = min(time_fn(step, "cpu", iters=2 * args.iters, flush=False) for _ in range(args.rounds))
        mb = w.unique_kv_bytes / 1e6
        print(f"| {name} | {cold * 1e3:.3f} | {warm * 1e3:.3f} | {cold / warm:.2f} | {mb:.1f} | "
              f"{mb / 1e3 / cold:.1f} | {100 * w.unique_kv_bytes / cold / bw:.0f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
