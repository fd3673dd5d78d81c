"""``tree_attention[cpu]`` on four memory layouts of the same paged K/V cache, same process.

``tree_attention`` takes ``k_cache`` / ``v_cache`` as ``[pages, page_size, Hk, D]`` views with any strides
(only ``D`` contiguous), so the bytes behind them can be laid out as

* **token-major** (``[pages, page_size, Hk, D]`` contiguous: the main job's layout): a KV head's
  consecutive rows are ``Hk * D * elem`` bytes apart (4 KiB at 8 heads x 128 fp32);
* **head-major** (``[pages, Hk, page_size, D]`` contiguous, passed as ``.transpose(1, 2)``): a head's rows
  of a page contiguous (``page_size * D * elem`` bytes);
* **vLLM LBNHC** and **vLLM LBHNC**: the per-layer tensor vLLM allocates for
  :mod:`multiverse_kernels.integrations.vllm` (logical ``[pages, Hk, page_size, 2 * D]``, K then V in the
  last dim, read in place as ``kv.transpose(1, 2)[..., :D]`` and ``[..., D:]``) in its two layouts:
  LBNHC stores it ``[pages, page_size, Hk, 2 * D]`` (token-major, a slot's heads adjacent), LBHNC
  ``[pages, Hk, page_size, 2 * D]`` (head-major: a head's K and V rows of a page interleaved in one
  contiguous run). The backend asks vLLM for LBHNC first on CPU and for LBNHC first elsewhere.

Every layout holds the same values and gives bitwise the same output (asserted). Steps: the main job's
decode forests and the single unshared sequence of ``benchmarks/vllm_cpu_peer.py`` (its ``make_step``),
cold (``bench.timing.time_fn``: the caches flushed before each call), in interleaved rounds, the median
over rounds::

    python benchmarks/cache_layouts.py                       # single, multiverse, sampling16; fp32, bf16
    python benchmarks/cache_layouts.py --forests single --page-size 16 --rounds 8

A plain script, not a ``test_*.py`` file: pytest does not collect it (benchmarks/conftest.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from multiverse_kernels import tree_attention
from multiverse_kernels.bench.timing import time_fn
from multiverse_kernels.bench.workloads import head_major
from multiverse_kernels.info import cpu_model, kernel_isa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm_cpu_peer import FORESTS, describe, make_step  # noqa: E402  (a sibling script, not a package)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = ("token-major", "head-major", "vLLM LBNHC", "vLLM LBHNC")


def layouts(k: torch.Tensor, v: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same ``[pages, page_size, Hk, D]`` K/V values as views of the four layouts."""
    d = k.shape[-1]
    nhc = torch.cat([k, v], -1).contiguous()  # LBNHC storage: [pages, page_size, Hk, 2D]
    hnc = head_major(nhc)  # LBHNC storage, the same view shape
    return {
        "token-major": (k.contiguous(), v.contiguous()),
        "head-major": (head_major(k), head_major(v)),
        "vLLM LBNHC": (nhc[..., :d], nhc[..., d:]),
        "vLLM LBHNC": (hnc[..., :d], hnc[..., d:]),
    }


def bench(name: str, dtype: torch.dtype, page_size: int, rounds: int, iters: int) -> dict[str, float]:
    """Median ms per layout over ``rounds`` interleaved rounds (the order alternating)."""
    w = make_step(name, dtype, page_size)
    fns = {key: (lambda kc=kc, vc=vc: tree_attention(w.q, kc, vc, w.meta, backend="cpu", **w.variant))
           for key, (kc, vc) in layouts(w.k_cache, w.v_cache).items()}
    outs = {key: fn() for key, fn in fns.items()}
    for key, out in outs.items():
        assert torch.equal(out, outs["token-major"]), f"{name} {dtype}: {key} differs from token-major"
    times: dict[str, list[float]] = {key: [] for key in fns}
    for r in range(rounds):
        for key in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
            times[key].append(time_fn(fns[key], "cpu", iters, warmup=1))
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forests", default="single,multiverse,sampling16")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--page-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iters", type=int, default=4, help="calls per round")
    args = ap.parse_args(argv)
    forests, dtypes = args.forests.split(","), args.dtypes.split(",")
    for name in forests:
        if name not in FORESTS:
            ap.error(f"--forests: unknown step {name!r}; expected a comma-separated subset of "
                     f"{', '.join(FORESTS)}")
    for dt in dtypes:
        if dt not in DTYPES:
            ap.error(f"--dtypes: unknown dtype {dt!r}; expected a comma-separated subset of "
                     f"{', '.join(DTYPES)}")
    if args.page_size < 1 or args.rounds < 1 or args.iters < 1:
        ap.error("--page-size, --rounds and --iters must be >= 1")
    isa, supported = kernel_isa()
    print(f"tree_attention[cpu] on four cache layouts | {cpu_model()}, {os.cpu_count()} logical CPUs, "
          f"{torch.get_num_threads()} torch threads | ISA path {isa} (CPU supports {supported}) | "
          f"page size {args.page_size} | "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| step | dtype | " + " | ".join(f"{k} ms" for k in LAYOUTS)
          + " | token-major / head-major | LBNHC / LBHNC |")
    print("|---|---|" + "---|" * len(LAYOUTS) + "---|---|")
    for name in forests:
        for dt in dtypes:
            ms = bench(name, DTYPES[dt], args.page_size, args.rounds, args.iters)
            ratios = (ms["token-major"] / ms["head-major"], ms["vLLM LBNHC"] / ms["vLLM LBHNC"])
            print(f"| {describe(name)} | {dt} | " + " | ".join(f"{ms[k]:.2f}" for k in LAYOUTS)
                  + "".join(f" | {r:.2f}x" for r in ratios) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
