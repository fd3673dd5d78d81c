"""The main job: one step over branching forests, tree_attention and its peers side by side in one run.

    python -m multiverse_kernels.bench                    # about 1.5 min on 2 CPU cores
    python -m multiverse_kernels.bench --dtype bfloat16 --forest multiverse
    python -m multiverse_kernels.bench --all              # also the reference backend (slow: seconds a call)
    python -m multiverse_kernels.bench --thread-table     # also the cpu kernel with 1 thread vs all
    python -m multiverse_kernels.bench --sweep all --json report.json --plot docs/img   # sweeps, JSON, PNG

For every forest of :data:`~multiverse_kernels.bench.workloads.BENCH_FORESTS` it times the fast
``tree_attention`` backends of the device and the peers a user would otherwise run
(:mod:`~multiverse_kernels.bench.peers`) in interleaved rounds, each round measuring the machine's limits
first (:mod:`~multiverse_kernels.bench.roofline`), and prints a detail table per forest, a summary table
(one row per forest: the layout the README shows) and a headline line. :data:`LEGEND` explains every
column.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace

import torch

from ..backends import available_backends, resolve
from ..info import cpu_model
from ..ops.tree_attention import tree_attention
from ..variants import variant_names
from . import roofline
from .peers import PEERS, methods, tree_backends
from .sweep import add_arguments, main_hook, table_record
from .timing import copy_bandwidth, time_fn
from .workloads import BENCH_FORESTS, VARIANT_FORESTS, Workload, head_major, make_workload

__all__ = ["main", "run_bench", "Row", "format_table", "format_summary", "headline", "LEGEND", "KV_LAYOUTS"]

KV_LAYOUTS = ("token-major", "head-major")
"""How :func:`run_bench` can store the backends' caches (``--kv-layout``)."""

LEGEND = """\
columns:
  time ms          median time of one step (one attention layer) over the rounds; each timed call starts
                   from cold caches (a 128 MiB read before it on the CPU, the L2 flushed on a GPU)
  vs best peer     the fastest peer's time / this method's time (> 1: faster than every peer)
  KV MB read       K+V bytes the method read from the cache, measured (the kernel's own load counter, or
                   an aten-level tally of what PyTorch ops read from the cache storage)
  x unique         KV MB read / the forest's unique KV bytes (every page some row sees, once: the lower
                   bound; 1.00 = each shared page read once per step)
  uniqKV GB/s      the forest's unique KV bytes / time: the useful bandwidth
  % copy BW        uniqKV GB/s as a share of the device's copy bandwidth measured in the same run
  % roofline       roofline time / time, where roofline time = max(unique KV bytes / read bandwidth,
                   step flops / GEMM rate in the step's dtype, or fp32's where faster on a CPU), both
                   rates measured at the start of the round (median of the rounds' shares); step flops =
                   4 * visible (row, token) pairs * head_dim * q heads
  % FMA peak       step flops / time / the fp32 FMA peak of the cpu kernel's ISA (register-resident FMA
                   chains on every thread): the hard compute ceiling of an fp32-FMA kernel
  per-branch       the per-branch paged decode peer (how engines run branches today: the prefix re-read
                   once per branch)"""


@dataclass
class Row:
    method: str
    seconds: float | None
    kv_bytes: int | None
    note: str = ""
    roof_share: float | None = None  # median of the per-round roofline shares
    fma_share: float | None = None  # same against the FMA peak
    is_peer: bool = False


def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr when it is a terminal (and tqdm is installed), else None."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, leave=False, unit="round")


def run_bench(forest: str, device: str, dtype: torch.dtype, iters: int, backends: list[str],
              peers: list[str], rounds: int = 3, bar=None, kv_layout: str = "token-major"
              ) -> tuple[Workload, list[Row], float]:
    """Time ``backends`` and ``peers`` on one forest in ``rounds`` interleaved rounds
    (:func:`roofline.paired_rounds`): each round measures the machine's rates (short runs), then times
    every method for ``ceil(iters / rounds)`` calls after a warm-up call. A method's time is the median
    over rounds and its roofline share the median of its per-round shares, so a method and its roof,
    and the methods among themselves, are compared on the same machine state (a shared VM drifts by tens
    of percent within a minute). ``kv_layout="head-major"``: the backends read the same cache values
    stored head-major (:func:`~.workloads.head_major`), the peers the token-major cache (their gathers
    would copy a strided one). Returns the backends' workload, one row per method and the copy
    bandwidth."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout: expected one of {KV_LAYOUTS}, got {kv_layout!r}")
    w = make_workload(forest, device, dtype)
    dev = w.q.device
    rows: list[Row] = []
    timed: list[tuple[Row, object]] = []
    wb = w if kv_layout == "token-major" else replace(w, k_cache=head_major(w.k_cache),
                                                      v_cache=head_major(w.v_cache))
    for m in methods(wb, backends, []) + methods(w, [], peers):
        try:
            step = m.build()
            time_fn(step, dev, 1, warmup=0, flush=False)  # compiles (Flex) and fails here if it cannot run
        except Exception as e:  # report a method that cannot run here instead of dying
            rows.append(Row(m.name, None, None, f"unavailable: {type(e).__name__}: {str(e)[:80]}",
                            is_peer=m.is_peer))
            continue
        row = Row(m.name, None, m.kv_bytes(step), m.note, is_peer=m.is_peer)
        rows.append(row)
        timed.append((row, step))
    per_round = max(1, -(-iters // max(1, rounds)))
    # A warm-up call in every round: the round's rate measurement ran in between (a decode step calls
    # attention layer after layer, so a first call after a pause is not one).
    timers = [lambda i, step=step: time_fn(step, dev, per_round, warmup=1) for _, step in timed]
    paired = roofline.paired_rounds(w.meta, tuple(w.q.shape), w.k_cache.shape[2], w.unique_kv_bytes, timers,
                                    dev, rounds, dtype=w.q.dtype,  # the step's (the fp8 forest: bf16 q)
                                    on_round=(lambda i: bar.update(1)) if bar is not None else None,
                                    window=w.variant.get("window"))
    for (row, _), r in zip(timed, paired, strict=True):
        row.seconds, row.roof_share, row.fma_share = r.seconds, r.roof_share, r.fma_share
    return wb, rows, copy_bandwidth(dev)


def _best_peer(rows: list[Row]) -> float | None:
    times = [r.seconds for r in rows if r.seconds and r.is_peer]
    return min(times) if times else None


def format_table(w: Workload, rows: list[Row], bw: float) -> str:
    """The detail table of one forest (every column of :data:`LEGEND`)."""
    uniq = w.unique_kv_bytes
    best = _best_peer(rows)
    m = w.meta
    lines = [
        f"## {BENCH_FORESTS[w.name][0] if w.name in BENCH_FORESTS else w.name}",
        f"{m.num_nodes} nodes, {m.num_groups} groups, {m.total_q} query rows, {int(m.node_len.sum())} "
        f"tokens; {w.q.shape[1]} q / {w.k_cache.shape[2]} KV heads, head_dim {w.q.shape[2]}, "
        f"{str(w.q.dtype).replace('torch.', '')}, page size {m.page_size}; unique KV {uniq / 1e6:.2f} MB; "
        f"copy bandwidth {bw / 1e9:.1f} GB/s",
        "",
        "| method | time ms | vs best peer | KV MB read | x unique | uniqKV GB/s | % copy BW | % roofline "
        "| % FMA peak | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.seconds is None:
            lines.append(f"| {r.method} | - | - | - | - | - | - | - | - | {r.note} |")
            continue
        kv = f"{r.kv_bytes / 1e6:.2f} | {r.kv_bytes / uniq:.2f}" if r.kv_bytes is not None else "- | -"
        sp = f"{best / r.seconds:.2f}x" if best else "-"
        roof = f"{100 * r.roof_share:.1f}%" if r.roof_share is not None else "-"
        fma = f"{100 * r.fma_share:.1f}%" if r.fma_share is not None else "-"
        lines.append(f"| {r.method} | {r.seconds * 1e3:.3f} | {sp} | {kv} | {uniq / r.seconds / 1e9:.2f} | "
                     f"{100 * uniq / r.seconds / bw:.1f}% | {roof} | {fma} | {r.note} |")
    return "\n".join(lines)


_SHORT = {"dense-mask SDPA": "dense-mask SDPA", "FlexAttention (compiled)": "FlexAttention (compiled)",
          "per-branch paged decode": "per-branch decode"}


def format_summary(results: list[tuple[Workload, list[Row]]]) -> str:
    """One row per forest: each fast backend's time and roofline share, each peer's time, the speedup of
    the first backend over the best peer, and KV read / unique for it and for per-branch decode."""
    if not results:
        return ""
    ours = [r.method for r in results[0][1] if not r.is_peer]
    peers = [r.method for r in results[0][1] if r.is_peer]
    head = ["forest", "dtype"]
    for o in ours:
        head += [o, "% roofline"]
    head += [_SHORT.get(p, p) for p in peers] + ["vs best peer", "KV read / unique (ours; per-branch)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w, rows in results:
        by = {r.method: r for r in rows}
        best = _best_peer(rows)
        cells = [BENCH_FORESTS[w.name][0] if w.name in BENCH_FORESTS else w.name,
                 {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(w.q.dtype,
                                                                                          str(w.q.dtype))]
        for o in ours:
            r = by[o]
            cells += [f"**{r.seconds * 1e3:.2f} ms**" if r.seconds else "-",
                      f"{100 * r.roof_share:.1f}%" if r.roof_share is not None else "-"]
        cells += [f"{by[p].seconds * 1e3:.1f} ms" if by[p].seconds else "n/a" for p in peers]
        first = by[ours[0]] if ours else None
        cells.append(f"**{best / first.seconds:.2f}x**" if first and first.seconds and best else "-")
        uniq = w.unique_kv_bytes
        pb = by.get("per-branch paged decode")
        kv = [f"{first.kv_bytes / uniq:.2f}" if first and first.kv_bytes is not None else "-",
              f"{pb.kv_bytes / uniq:.2f}" if pb and pb.kv_bytes is not None else "-"]
        cells.append("; ".join(kv))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(results: list[tuple[Workload, list[Row]]]) -> str:
    """``tree_attention[cpu]: 7.4x the best peer on multiverse, ...`` for the first fast backend."""
    parts = []
    name = None
    for w, rows in results:
        ours = [r for r in rows if not r.is_peer and r.seconds]
        best = _best_peer(rows)
        if not ours or best is None:
            continue
        name = name or ours[0].method
        r = next((x for x in ours if x.method == name), None)
        if r is not None:
            peer = min((x for x in rows if x.is_peer and x.seconds), key=lambda x: x.seconds)
            short = _SHORT.get(peer.method, peer.method)
            parts.append(f"{best / r.seconds:.1f}x on {w.name} (best peer: {short})")
    if not parts:
        return "headline: no tree_attention backend and peer both ran"
    return f"{name}: {', '.join(parts)}"


def _runs_variant(forest: str, backends: list[str], dev: torch.device) -> bool:
    """Whether some backend of ``backends`` implements ``forest``'s attention variant (plain forests:
    always)."""
    need = set(VARIANT_FORESTS.get(forest, {}))
    return not need or any(need <= variant_names(resolve("tree_attention", b, dev)) for b in backends)


def _machine_line(device: str) -> str:
    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name()}"
    return roofline.describe_cpu()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multiverse_kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LEGEND)
    p.add_argument("--forest", choices=[*BENCH_FORESTS, "all", "none"], default="all",
                   help="main tables to print (none: only the sweeps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--backend", action="append", help="tree_attention backends to time (default: the fast "
                   "ones available for the device; 'reference' only when named or with --all)")
    p.add_argument("--all", action="store_true", help="also time the reference backend (the spec: seconds "
                   "per call)")
    p.add_argument("--iters", type=int, default=6, help="timed calls per method, over all rounds")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (rates measured in each)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--kv-layout", choices=KV_LAYOUTS, default="token-major",
                   help="how the backends' caches are stored: token-major [pages, page_size, Hk, D] "
                   "(default), or head-major ([pages, Hk, page_size, D] storage passed as a strided view: "
                   "faster for the cpu kernel on some CPUs, docs/api.md); peers always read token-major")
    p.add_argument("--thread-table", action="store_true",
                   help="also time the cpu kernel with 1 thread and with all threads (paired rounds)")
    add_arguments(p)
    a = p.parse_args(argv)
    if a.kv_layout != "token-major" and a.sweep:
        p.error(f"--kv-layout {a.kv_layout}: the sweeps (--sweep) time token-major caches only; run them "
                "without --kv-layout")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if a.device.startswith("cuda")
                                                     else torch.float32)
    dev = torch.device(a.device)
    backends = tree_backends(dev, a.backend, include_reference=a.all)
    peers = [] if a.no_peers else list(PEERS)
    forests = {"all": list(BENCH_FORESTS), "none": []}.get(a.forest, [a.forest])
    skipped = [f for f in forests if not _runs_variant(f, backends, dev)]
    if a.forest == "all":  # a variant forest no timed backend implements would time only the peers
        forests = [f for f in forests if f not in skipped]
    torch.manual_seed(0)
    # About 8 s per method and forest on 2 CPU cores (rounds, rate measurements, FlexAttention's compile),
    # the reference backend about 60 s; a GPU is much faster.
    est = len(forests) * (8 * (len(backends) + len(peers)) + (60 if "reference" in backends else 0)
                          + (25 if a.thread_table else 0))
    print(f"multiverse_kernels benchmark | torch {torch.__version__} | device {a.device} | "
          f"auto backend: {available_backends('tree_attention', dev)[0]} | {torch.get_num_threads()} threads")
    print(_machine_line(a.device))
    if forests:
        print(f"timing {', '.join(backends) or 'no backend'} ({a.kv_layout} caches) and {len(peers)} peers "
              f"on {len(forests)} forest(s), {a.rounds} rounds each: about {est // 60} min {est % 60} s on a "
              "2-core CPU", flush=True)
        if dev.type == "cpu":
            print(roofline.describe_cpu_peaks(roofline.cpu_peaks()), flush=True)
    for f in skipped if a.forest == "all" else []:
        need = ", ".join(VARIANT_FORESTS[f])
        print(f"forest {f}: skipped, no timed backend implements its variant ({need}) on this device "
              "(docs/design.md, 'Attention variants')")
    bar = _progress(len(forests) * a.rounds, not a.no_progress)
    results, tables = [], []
    t0 = time.perf_counter()
    for forest in forests:
        if bar is not None:
            bar.set_description(forest)
        w, rows, bw = run_bench(forest, a.device, dtype, a.iters, backends, peers, a.rounds, bar, a.kv_layout)
        print()
        print(format_table(w, rows, bw), flush=True)
        if a.thread_table and dev.type == "cpu" and "cpu" in backends:
            fn = lambda w=w: tree_attention(w.q, w.k_cache, w.v_cache, w.meta, backend="cpu",  # noqa: E731
                                            validate=False)
            print()
            print(roofline.thread_scaling(w.meta, tuple(w.q.shape), w.k_cache.shape[2], w.unique_kv_bytes,
                                          {"tree_attention[cpu]": fn},
                                          lambda f: time_fn(f, dev, a.iters), rounds=a.rounds, dtype=dtype),
                  flush=True)
        results.append((w, rows))
        tables.append(table_record(w, rows, bw))
    if bar is not None:
        bar.close()
    if results:
        print()
        args = " ".join(sys.argv[1:] if argv is None else argv)
        where = cpu_model() if dev.type == "cpu" else torch.cuda.get_device_name()
        print(f"## Summary ({where}, {torch.get_num_threads()} threads; "
              f"`python -m multiverse_kernels.bench{' ' + args if args else ''}`)")
        print()
        print(format_summary(results))
        print()
        print(LEGEND)
        print()
        print(f"({time.perf_counter() - t0:.0f} s)")
        print(headline(results), flush=True)
    main_hook(a, dtype, tables, sys.argv[1:] if argv is None else argv)
    return 0
