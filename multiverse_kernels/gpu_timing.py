"""Honest GPU timing for the benchmark (used by :mod:`multiverse_kernels.bench` when the device is CUDA).

* :func:`time_cuda`: the call is captured once in a CUDA graph (no Python or launch overhead in the
  measurement) and replayed; each replay is bracketed by CUDA events, and the L2 cache is flushed before
  every replay (a memset of a buffer twice the L2 size, outside the events), so the KV set is read from
  DRAM each time as in a real decode step whose KV does not stay resident between layers. A call that
  cannot be captured (host syncs) is timed eagerly between the same events, with the same flush, and
  says so (:data:`last_method`).
* :func:`copy_bandwidth`: device-to-device copy bandwidth measured the same way (read + write bytes).
* :func:`ncu_dram_bytes` / ``python -m multiverse_kernels.gpu_timing --ncu-table``: DRAM bytes read by
  each method's kernels, from Nsight Compute (``ncu``, when installed) profiling one call in a child
  process, next to the forest's unique KV bytes.

Nothing here but :func:`flush_caches` (which :func:`multiverse_kernels.bench.time_fn` also uses on the
CPU) runs without a GPU; tests/tooling/test_gpu_run.py checks the pure parts (ncu CSV parsing) on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch

__all__ = ["time_cuda", "copy_bandwidth", "flush_bytes", "flush_caches", "ncu_dram_bytes", "parse_ncu_csv",
           "last_method"]

last_method = ""  # how the last time_cuda call timed: "cuda-graph" or "eager (...)"
_FLUSH: dict[tuple[str, int], torch.Tensor] = {}


def flush_bytes(device: torch.device) -> int:
    """Size of the cache flush buffer: twice the device's L2 (at least 64 MiB) on CUDA; 128 MiB on the
    CPU (several times the last-level cache of the machines this runs on)."""
    if torch.device(device).type != "cuda":
        return 128 << 20
    props = torch.cuda.get_device_properties(device)
    return max(2 * int(getattr(props, "L2_cache_size", 0) or 0), 64 << 20)


def flush_caches(device: torch.device) -> None:
    """Evict the device's caches before a timed call, so that the KV set comes from DRAM as in a real
    decode step (a layer's KV was last touched a whole forward pass earlier): on CUDA a memset of
    :func:`flush_bytes` (the L2); on the CPU a read of it (the last-level cache; read, not written, so
    that the lines it evicts are clean and the timed call pays no write-backs)."""
    device = torch.device(device)
    key = (device.type, device.index or 0)
    if key not in _FLUSH:
        _FLUSH[key] = torch.ones(flush_bytes(device) // 4, dtype=torch.float32, device=device)
    if device.type == "cuda":
        _FLUSH[key].zero_()
    else:
        _FLUSH[key].sum()


def time_cuda(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3,
              flush_l2: bool = True) -> float:
    """Median seconds of one ``fn()`` on the GPU: CUDA-graph replays timed by CUDA events, L2 flushed
    before each replay. Falls back to eager calls between events when ``fn`` cannot be captured."""
    global last_method
    device = torch.device(device)
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
            last_method = "cuda-graph"
        except Exception as e:  # host syncs or uncapturable ops: time eagerly, and say so
            torch.cuda.synchronize()
            run = fn
            last_method = f"eager ({type(e).__name__})"
        run()  # the first replay uploads the graph
        torch.cuda.synchronize()
        times = []
        for _ in range(max(1, iters)):
            if flush_l2:
                flush_caches(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 512 << 20, iters: int = 10) -> float:
    """Device copy bandwidth in bytes/s (read + write), timed like :func:`time_cuda`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_cuda(lambda: dst.copy_(src), device, iters)


# ---- Nsight Compute DRAM bytes ---------------------------------------------------------------------------

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
           "--target-processes", "all", sys.executable, "-m", "multiverse_kernels.gpu_timing", "--ncu-child",
           "--forest", forest, "--method", method, "--dtype", dtype]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"ncu failed ({res.returncode}): {res.stderr[-500:]}")
    return parse_ncu_csv(res.stdout)


def _methods(w) -> dict[str, Callable[[], object]]:
    from . import bench
    from .backends import available_backends
    from .ops import tree_attention

    out: dict[str, Callable[[], object]] = {}
    for b in available_backends("tree_attention", w.q.device):
        out[f"tree_attention[{b}]"] = (lambda b=b: tree_attention(w.q, w.k_cache, w.v_cache, w.meta,
                                                                  backend=b, validate=False))
    out["dense-mask SDPA"] = bench.dense_sdpa_peer(w)
    out["FlexAttention (compiled)"] = bench.flex_peer(w)
    out["per-branch paged decode"] = bench.per_branch_peer(w)
    return out


def _ncu_child(forest: str, method: str, dtype: str) -> None:
    from . import bench

    w = bench.make_workload(forest, "cuda", getattr(torch, dtype))
    fn = _methods(w)[method]
    fn()  # warm-up: compiles, plans; not profiled
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def ncu_table(forests: list[str], dtype: str) -> str:
    """Markdown table: each method's DRAM bytes read (ncu) next to the forest's unique KV bytes."""
    from . import bench

    lines = ["| forest | method | unique KV MB | DRAM read MB (ncu) | x unique |", "|---|---|---|---|---|"]
    for forest in forests:
        w = bench.make_workload(forest, "cuda", getattr(torch, dtype))
        unique = w.unique_kv_bytes
        for method in _methods(w):
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
    p = argparse.ArgumentParser(prog="python -m multiverse_kernels.gpu_timing", description=__doc__,
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
