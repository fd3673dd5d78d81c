"""Sweeps of the benchmark report: JSON and PNG plots (``python -m multiverse_kernels.bench --sweep ...``).

Two sweeps over a sampling-shaped forest (a prompt, ``readers`` branches of ``branch_len`` tokens each,
every branch decoding one token):

- ``readers``: 1 to 256 branches over a fixed prompt (default 1024 tokens): how the step scales with
  the number of rows that share the prompt.
- ``prompt``: prompts of 128 to 32K tokens at a fixed number of branches (default 16): short prompts
  show the fixed costs (a cascade-style kernel can lose to plain decode when the shared part is small),
  long ones the bandwidth.

Every method of the main job is timed at every point (``tree_attention`` on each available backend but
the reference, dense-mask SDPA and per-branch paged decode, i.e. plain decode of every branch on its
own; compiled FlexAttention with ``--sweep-flex``, off by default because it compiles once per shape,
about a minute per point on 2 CPU cores), with the KV bytes it read, measured the same way as the main
tables (:mod:`multiverse_kernels.bench.peers`). ``--json PATH`` writes every number (and the main tables);
``--plot DIR`` writes ``<DIR>/sweep_readers.png`` and ``<DIR>/sweep_prompt.png`` (matplotlib): time
per step, speedup over per-branch decode, and KV bytes read against the unique KV bytes. A progress bar
(tqdm) runs on stderr.

The default sizes keep the whole sweep to a few minutes on a 2-core CPU; ``--sweep-readers`` and
``--sweep-prompts`` take other lists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .. import __version__
from ..info import cpu_isa
from .peers import PEERS, methods, tree_backends
from .timing import sync, time_fn
from .workloads import sweep_workload

__all__ = ["add_arguments", "run_sweep", "plot_sweep", "write_report", "main_hook",
           "DEFAULT_READERS", "DEFAULT_PROMPTS"]

DEFAULT_READERS = (1, 4, 16, 64, 256)
DEFAULT_PROMPTS = (128, 512, 2048, 8192, 32768)
FIXED_PROMPT = 1024
FIXED_READERS = 16
BRANCH_LEN = 64
PER_BRANCH = "per-branch paged decode"


def _time(fn: Callable[[], object], device: torch.device, max_iters: int, budget_s: float) -> float:
    """Median seconds per call: one warm-up, then up to ``max_iters`` calls within ``budget_s`` (at
    least 2)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    iters = max(2, min(max_iters, int(budget_s / one)))
    return time_fn(fn, device, iters, warmup=0)


def _methods(w: Any, device: torch.device, backends: list[str] | None, peers: Iterable[str]
             ) -> list[tuple[str, Callable[[], object], Callable[[], int]]]:
    """(name, build the timed callable, KV-bytes measurement of it) per method: the main job's
    :func:`~multiverse_kernels.bench.peers.methods` (every fast backend unless ``backends`` names some)."""
    return [(m.name, m.build, m.kv_bytes) for m in methods(w, tree_backends(device, backends), peers)]


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=True)
    except ImportError:  # plain lines when tqdm is not installed
        class _Lines:
            n = 0

            def update(self, k: int = 1) -> None:
                self.n += k
                if enabled:
                    print(f"{desc}: {self.n}/{total}", file=sys.stderr, flush=True)

            def set_postfix_str(self, s: str) -> None:
                pass

            def close(self) -> None:
                pass

        return _Lines()


def run_sweep(kind: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
              values: Iterable[int] | None = None, fixed: int | None = None, branch_len: int = BRANCH_LEN,
              backends: list[str] | None = None,
              peers: Iterable[str] = tuple(PEERS),
              max_iters: int = 10, budget_s: float = 1.0, progress: bool = True) -> dict[str, Any]:
    """Run one sweep; returns its JSON-ready record.

    ``kind``: "readers" (values = branch counts, ``fixed`` = prompt tokens) or "prompt" (values =
    prompt tokens, ``fixed`` = branches). Each point: unique KV bytes and, per method, seconds per step
    (median), KV bytes read, or the error that kept it from running.
    """
    if kind not in ("readers", "prompt"):
        raise ValueError(f"kind: expected 'readers' or 'prompt', got {kind!r}")
    if kind == "readers":
        values = list(values or DEFAULT_READERS)
        fixed = FIXED_PROMPT if fixed is None else fixed
    else:
        values = list(values or DEFAULT_PROMPTS)
        fixed = FIXED_READERS if fixed is None else fixed
    dev = torch.device(device)
    peers = list(peers)
    points = []
    n_methods = len(_methods(sweep_workload(16, 1, 1, device, dtype), dev, backends, peers))
    bar = _progress(len(values) * n_methods, f"sweep {kind}", progress)
    for x in values:
        prompt, readers = (fixed, x) if kind == "readers" else (x, fixed)
        w = sweep_workload(prompt, readers, branch_len, device, dtype)
        point: dict[str, Any] = {"prompt": prompt, "readers": readers, "branch_len": branch_len,
                                 "unique_kv_bytes": w.unique_kv_bytes, "methods": {}}
        for name, build, kv in _methods(w, dev, backends, peers):
            bar.set_postfix_str(f"{kind}={x} {name}")
            try:
                fn = build()  # a peer builds its mask or compiles here
                secs = _time(fn, dev, max_iters, budget_s)
                point["methods"][name] = {"seconds": secs, "kv_bytes": int(kv(fn))}
            except Exception as e:  # a peer that cannot run at this size: recorded, not fatal
                point["methods"][name] = {"seconds": None, "kv_bytes": None,
                                          "error": f"{type(e).__name__}: {str(e)[:120]}"}
            bar.update(1)
        points.append(point)
        del w
    bar.close()
    w0 = sweep_workload(16, 1, 1, device, dtype)
    return {
        "kind": kind, "x": "readers" if kind == "readers" else "prompt",
        "fixed": {"prompt": fixed} if kind == "readers" else {"readers": fixed},
        "branch_len": branch_len, "num_qo_heads": w0.q.shape[1], "num_kv_heads": w0.k_cache.shape[2],
        "head_dim": w0.q.shape[2], "dtype": str(dtype).replace("torch.", ""),
        "page_size": w0.meta.page_size, "points": points,
    }


def machine() -> dict[str, Any]:
    """The machine and software a report was measured on."""
    cpu = cpu_isa()
    out = {"cpu": cpu["model"], "isa": cpu["kernel_isa"], "threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__,
           "multiverse_kernels": __version__, "gpu": None,
           "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _short(name: str) -> str:
    return {"dense-mask SDPA": "dense SDPA", "FlexAttention (compiled)": "Flex (compiled)",
            PER_BRANCH: "per-branch decode"}.get(name, name)


def plot_sweep(sweep: dict[str, Any], path: str, title_suffix: str = "") -> str:
    """Three panels (time per step, speedup over per-branch decode, KV MB read with the unique-KV
    line) against the swept variable, log-log. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs_key = sweep["x"]
    pts = sweep["points"]
    xs = [p[xs_key] for p in pts]
    methods = list(pts[0]["methods"]) if pts else []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in methods:
        style = dict(marker="o", lw=2.2) if m.startswith("tree_attention") else dict(marker=".", lw=1.2)
        t = [(x, p["methods"][m]["seconds"]) for x, p in zip(xs, pts) if p["methods"][m]["seconds"]]
        if t:
            axes[0].plot(*zip(*[(x, s * 1e3) for x, s in t]), label=_short(m), **style)
        sp = [(x, p["methods"][PER_BRANCH]["seconds"] / p["methods"][m]["seconds"]) for x, p in zip(xs, pts)
              if p["methods"][m]["seconds"] and p["methods"].get(PER_BRANCH, {}).get("seconds")]
        if sp and m != PER_BRANCH:
            axes[1].plot(*zip(*sp), label=_short(m), **style)
        kv = [(x, p["methods"][m]["kv_bytes"] / 1e6) for x, p in zip(xs, pts)
              if p["methods"][m]["kv_bytes"] is not None]
        if kv:
            axes[2].plot(*zip(*kv), label=_short(m), **style)
    axes[2].plot(xs, [p["unique_kv_bytes"] / 1e6 for p in pts], "k--", lw=1, label="unique KV (lower bound)")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    xlabel = "branches (readers) sharing the prompt" if xs_key == "readers" else "prompt tokens"
    for ax, yl in zip(axes, ("ms per decode step", "speedup over per-branch decode (x)", "KV MB read")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fixed = ", ".join(f"{k} {v}" for k, v in sweep["fixed"].items())
    fig.suptitle(f"one decode step: {fixed}, branches of {sweep['branch_len']} tokens, "
                 f"{sweep['num_qo_heads']} q / {sweep['num_kv_heads']} KV heads, d {sweep['head_dim']}, "
                 f"{sweep['dtype']}, page {sweep['page_size']}{title_suffix}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(path: str, tables: list[dict[str, Any]], sweeps: list[dict[str, Any]],
                 command: str) -> None:
    """JSON report: the machine, the command, the main tables and the sweeps."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine(), "command": command, "tables": tables, "sweeps": sweeps}, f,
                  indent=1)
        f.write("\n")


def table_record(w: Any, rows: list[Any], bw: float) -> dict[str, Any]:
    """One main-job table as JSON (rows of :func:`multiverse_kernels.bench.report.run_bench`)."""
    m = w.meta
    return {
        "forest": w.name, "nodes": m.num_nodes, "groups": m.num_groups, "rows": m.total_q,
        "tokens": int(m.node_len.sum()), "num_qo_heads": w.q.shape[1], "num_kv_heads": w.k_cache.shape[2],
        "head_dim": w.q.shape[2], "dtype": str(w.q.dtype).replace("torch.", ""), "page_size": m.page_size,
        "device": str(w.q.device), "unique_kv_bytes": w.unique_kv_bytes, "copy_bandwidth_bytes_per_s": bw,
        "methods": [{"method": r.method, "seconds": r.seconds, "kv_bytes": r.kv_bytes, "note": r.note,
                     "roofline_share": getattr(r, "roof_share", None),
                     "fma_peak_share": getattr(r, "fma_share", None)} for r in rows],
    }


# ------------------------------------------------------------------------------- the main job's hooks
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The report flags of ``python -m multiverse_kernels.bench``."""
    g = p.add_argument_group("report (sweeps, JSON, plots)")
    g.add_argument("--sweep", choices=["readers", "prompt", "all"], action="append",
                   help="run a sweep: readers 1..256 over a fixed prompt, or prompt 128..32K at fixed "
                   "readers")
    g.add_argument("--sweep-readers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help=f"comma-separated reader counts (default {','.join(map(str, DEFAULT_READERS))})")
    g.add_argument("--sweep-prompts", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help=f"comma-separated prompt lengths (default {','.join(map(str, DEFAULT_PROMPTS))})")
    g.add_argument("--sweep-fixed-prompt", type=int, default=FIXED_PROMPT)
    g.add_argument("--sweep-fixed-readers", type=int, default=FIXED_READERS)
    g.add_argument("--sweep-budget", type=float, default=1.0,
                   help="seconds of timed calls per method and point (at least 2 calls)")
    g.add_argument("--sweep-flex", action="store_true",
                   help="also time compiled FlexAttention in the sweeps (one compile per point)")
    g.add_argument("--json", metavar="PATH", help="write the tables and sweeps as JSON")
    g.add_argument("--plot", metavar="DIR", help="write sweep_<kind>.png plots (matplotlib) into DIR")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_hook(a: argparse.Namespace, dtype: torch.dtype, tables: list[dict[str, Any]],
              argv: list[str]) -> None:
    """Run the requested sweeps after the main tables, print a summary, write JSON / plots."""
    kinds: list[str] = []
    for s in a.sweep or []:
        kinds += ["readers", "prompt"] if s == "all" else [s]
    sweeps = []
    for kind in dict.fromkeys(kinds):
        sw = run_sweep(kind, a.device, dtype,
                       values=a.sweep_readers if kind == "readers" else a.sweep_prompts,
                       fixed=a.sweep_fixed_prompt if kind == "readers" else a.sweep_fixed_readers,
                       backends=a.backend, max_iters=a.iters, budget_s=a.sweep_budget,
                       peers=[] if a.no_peers else ["dense-mask SDPA"]
                       + (["FlexAttention (compiled)"] if a.sweep_flex else []) + [PER_BRANCH],
                       progress=not a.no_progress)
        sweeps.append(sw)
        print()
        print(format_sweep(sw))
        sys.stdout.flush()
    cmd = "python -m multiverse_kernels.bench " + " ".join(argv)
    if a.plot:
        if not sweeps:
            print("--plot: no sweep was run (add --sweep readers|prompt|all)", file=sys.stderr)
        mach = machine()
        where = f"\n{mach['gpu'] or mach['cpu']}, {mach['threads']} threads, torch {mach['torch']}"
        for sw in sweeps:
            path = plot_sweep(sw, os.path.join(a.plot, f"sweep_{sw['kind']}.png"), where)
            print(f"wrote {path}")
    if a.json:
        write_report(a.json, tables, sweeps, cmd.strip())
        print(f"wrote {a.json}")


def format_sweep(sw: dict[str, Any]) -> str:
    """Text table of a sweep: ms per step per method, and each method's KV bytes / unique."""
    pts = sw["points"]
    methods = list(pts[0]["methods"]) if pts else []
    key = sw["x"]
    head = f"{key:>8}" + "".join(f"{_short(m)[:22]:>24}" for m in methods)
    lines = [f"sweep {sw['kind']} ({', '.join(f'{k} {v}' for k, v in sw['fixed'].items())}, branches of "
             f"{sw['branch_len']}; ms per step, KV read / unique in brackets)", head]
    for p in pts:
        cells = []
        for m in methods:
            r = p["methods"][m]
            if r["seconds"] is None:
                cells.append(f"{'failed':>24}")
            else:
                cells.append(f"{r['seconds'] * 1e3:14.3f} ({r['kv_bytes'] / p['unique_kv_bytes']:5.2f}x)")
        lines.append(f"{p[key]:>8}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)
