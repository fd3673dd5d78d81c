"""The CPU kernel on the parts of the main job's Multiverse step, to see where its time goes.

    python scripts/cpu_step_parts.py                     # the table (about a minute on 2 cores)
    python scripts/cpu_step_parts.py --part prefix --seconds 20   # a loop to attach `perf record` to

Parts (32 q / 8 KV heads, head_dim 128, page size 16, fp32 unless --dtype):
  multiverse  the main job's forest (multiverse_kernels.bench.workloads.build_forest("multiverse"))
  prefix      its compute-bound part: a 4096-token prefix read by 9 one-token readers (36 packed rows
              per KV head)
  prefix-l3   the same with a 512-token prefix (4 MiB of K+V fp32: resident in the last-level cache
              when warm)
  prefix-l2   `prefix` with its page table cycling over 2 pages (256 KiB of K+V, read from L2 after
              their first touch, cold or warm): the same flops and the same instructions with no
              DRAM traffic, to see what loading the prefix costs (a timing device: the pages repeat)
  paths       its memory-bound part: a 16-token prefix, 8 paths x 512 and a 32-token conclusion
              joining them (every path chunk read by 2 rows: its path and the conclusion)
For each part and thread count (1 and all): the median time of a call from cold caches (the bench's
timer, multiverse_kernels.bench.timing.time_fn) and of warm back-to-back calls, GFLOP/s per thread
(step flops: multiverse_kernels.bench.roofline.step_flops) and the unique K+V bytes per second
(prefix-l2: of the forest as if its pages did not repeat).
"""

from __future__ import annotations

import argparse
import time

import torch

from multiverse_kernels import tree_attention
from multiverse_kernels.bench.roofline import step_flops
from multiverse_kernels.bench.timing import time_fn
from multiverse_kernels.bench.workloads import (
    BENCH_HEADS,
    build_forest,
    multiverse_forest,
    sampling_forest,
    workload_from_forest,
)
from multiverse_kernels.forest import KVForest

HQ, HK, D = BENCH_HEADS
PAGE = 16
PARTS = ("multiverse", "prefix", "prefix-l3", "prefix-l2", "paths")


def part_forest(part: str) -> tuple[KVForest, list[tuple[int, int]]]:
    """The part's forest, built from the benchmark forests' builders."""
    if part == "multiverse":
        return build_forest("multiverse", PAGE)
    if part in ("prefix", "prefix-l3", "prefix-l2"):  # 9 one-token readers of one prefix
        return sampling_forest(512 if part == "prefix-l3" else 4096, 9, 1, page_size=PAGE)
    if part == "paths":
        return multiverse_forest(16, 8, 512, 32, page_size=PAGE, concl_q=1)
    raise ValueError(f"part: expected one of {PARTS}, got {part!r}")


def workload(part: str, dtype: torch.dtype):
    """The part's :class:`~multiverse_kernels.bench.workloads.Workload` (prefix-l2: page list cycled)."""
    f, groups = part_forest(part)
    meta = f.metadata(groups)
    if part == "prefix-l2":  # the prefix's (node 0's) page list cycles over its first two pages
        a, b = int(meta.node_page_indptr[0]), int(meta.node_page_indptr[1])
        pages = meta.node_page_indices[a:b]
        meta.node_page_indices[a:b] = pages[:2].repeat((b - a + 1) // 2)[: b - a]
    return workload_from_forest(part, f, groups, "cpu", dtype, meta=meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--part", choices=PARTS, help="only this part")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--seconds", type=float, help="call --part in a loop for this long (for a profiler)")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.seconds is not None:
        w = workload(a.part or "prefix", dtype)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            tree_attention(w.q, w.k_cache, w.v_cache, w.meta, backend="cpu", validate=False)
        return
    cpu = torch.device("cpu")
    all_threads = torch.get_num_threads()
    print(f"{'part':<12}{'threads':>8}{'cold ms':>10}{'warm ms':>10}{'GFLOP/s/thread':>16}{'uniq GB/s':>11}")
    for part in [a.part] if a.part else PARTS:
        w = workload(part, dtype)
        flops = step_flops(w.meta, HQ, HK, D)
        fn = lambda w=w: tree_attention(w.q, w.k_cache, w.v_cache, w.meta, backend="cpu", validate=False)
        for nt in sorted({1, all_threads}):
            torch.set_num_threads(nt)
            cold = time_fn(fn, cpu, a.iters)
            warm = time_fn(fn, cpu, a.iters, flush=False)
            print(f"{part:<12}{nt:>8}{cold * 1e3:>10.3f}{warm * 1e3:>10.3f}{flops / cold / nt / 1e9:>16.1f}"
                  f"{w.unique_kv_bytes / cold / 1e9:>11.1f}")
        torch.set_num_threads(all_threads)


if __name__ == "__main__":
    main()
