"""DRAM bytes each method of the main job reads on a GPU, from Nsight Compute:
``python -m multiverse_kernels.bench.ncu --ncu-table`` (ncu profiles one call in a child process; needs a
GPU and ``ncu``). :func:`parse_ncu_csv` is pure and tested on the CPU (tests/tooling/test_gpu_run.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import torch

from .peers import methods, tree_backends
from .workloads import Workload, make_workload

__all__ = ["NCU_METRIC", "parse_ncu_csv", "ncu_dram_bytes", "ncu_table", "main"]


NCU_METRIC = "dram__bytes_read.sum"


def parse_ncu_csv(text: str, metric: str = NCU_METRIC) -> int:
    """Sum of ``metric`` over every profiled kernel in ``ncu --csv --print-units base`` output."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    total = 0.0
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if row.get("Metric Name") == metric:
            total += float(row["Metric Value"].replace(",", ""))
    return int(total)


def ncu_dram_bytes(forest: str, method: str, dtype: str, timeout: float = 300) -> int | None:
    """DRAM bytes read by one call of ``method`` on ``forest`` (ncu in a child process), or None when
    ncu is not installed. Only kernels inside the child's profiler range are counted."""
    ncu = shutil.which("ncu") or ("/usr/local/cuda/bin/ncu" if os.path.exists("/usr/local/cuda/bin/ncu")
                                  else None)
    if ncu is None:
        return None
    cmd = [ncu, "--profile-from-start", "off", "--metrics", NCU_METRIC, "--csv", "--print-units", "base",
           "--target-processes", "all", sys.executable, "-m", "multiverse_kernels.bench.ncu", "--ncu-child",
           "--forest", forest, "--method", method, "--dtype", dtype]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"ncu failed ({res.returncode}): {res.stderr[-500:]}")
    return parse_ncu_csv(res.stdout)


def _steps(w: Workload) -> dict[str, Callable[[], object]]:
    """Every method of the main job on ``w`` by name (peers built lazily)."""
    return {m.name: m for m in methods(w, tree_backends(w.q.device))}  # type: ignore[misc]


def _ncu_child(forest: str, method: str, dtype: str) -> None:
    w = make_workload(forest, "cuda", getattr(torch, dtype))
    fn = _steps(w)[method].build()
    fn()  # warm-up: compiles, plans; not profiled
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def ncu_table(forests: list[str], dtype: str) -> str:
    """Markdown table: each method's DRAM bytes read (ncu) next to the forest's unique KV bytes."""
    lines = ["| forest | method | unique KV MB | DRAM read MB (ncu) | x unique |", "|---|---|---|---|---|"]
    for forest in forests:
        w = make_workload(forest, "cuda", getattr(torch, dtype))
        unique = w.unique_kv_bytes
        for method in _steps(w):
            try:
                dram = ncu_dram_bytes(forest, method, dtype)
            except Exception as e:
                lines.append(f"| {forest} | {method} | {unique / 1e6:.1f} | failed: {str(e)[:60]} | |")
                continue
            if dram is None:
                return "ncu not installed: no DRAM column"
            lines.append(f"| {forest} | {method} | {unique / 1e6:.1f} | {dram / 1e6:.1f} | "
                         f"{dram / unique:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multiverse_kernels.bench.ncu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ncu-table", action="store_true", help="print the ncu DRAM-bytes table")
    p.add_argument("--ncu-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--forest", default="all")
    p.add_argument("--method", default="")
    p.add_argument("--dtype", default="float16")
    a = p.parse_args(argv)
    if a.ncu_child:
        _ncu_child(a.forest, a.method, a.dtype)
        return 0
    if not torch.cuda.is_available():
        print("skipped: no GPU (torch.cuda.is_available() is False)")
        return 0
    forests = ["multiverse", "sampling16"] if a.forest == "all" else [a.forest]
    print(ncu_table(forests, a.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
