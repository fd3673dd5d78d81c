"""Timing for the benchmarks: one timer for every device, the cache flush, copy bandwidth.

* :func:`time_fn`: median seconds per call. On the CPU: host wall-clock around each call, the caches
  flushed before each (:func:`flush_caches`; ``flush=False``: warm back-to-back calls, for comparison
  only). On CUDA: :func:`time_cuda`.
* :func:`time_cuda`: the call is captured once in a CUDA graph (no Python or launch overhead in the
  measurement) and replayed; each replay is bracketed by CUDA events, and the L2 cache is flushed before
  every replay (a memset of a buffer twice the L2 size, outside the events), so the KV set is read from
  DRAM each time as in a real decode step whose KV does not stay resident between layers. A call that
  cannot be captured (host syncs) is timed eagerly between the same events, with the same flush, and
  says so (:data:`last_method`).
* :func:`copy_bandwidth`: the device's copy bandwidth (read + write bytes), timed by :func:`time_fn`.

Nsight Compute DRAM bytes: :mod:`multiverse_kernels.bench.ncu`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["time_fn", "time_cuda", "copy_bandwidth", "flush_bytes", "flush_caches", "sync", "last_method"]

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


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: torch.device | str, iters: int, warmup: int = 2,
            flush: bool = True) -> float:
    """Median seconds per call of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones. On CUDA:
    :func:`time_cuda` (CUDA-graph replays, events, L2 flushed unless ``flush=False``); elsewhere host
    wall-clock around each call with the caches flushed before each (``flush=False``: warm,
    back-to-back calls, for comparison only)."""
    device = torch.device(device)
    if device.type == "cuda":
        return time_cuda(fn, device, iters, warmup, flush_l2=flush)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, iters)):
        if flush:
            flush_caches(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device | str, nbytes: int = 256 << 20, iters: int = 5) -> float:
    """The device's copy bandwidth in bytes/s (read + write counted), timed by :func:`time_fn`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_fn(lambda: dst.copy_(src), device, iters, flush=False)
