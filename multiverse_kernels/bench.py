"""Main job: one decode step over branching forests, every method side by side in one run.

    python -m multiverse_kernels.bench                 # every backend, the three forests
    python -m multiverse_kernels.bench --forest multiverse --iters 20
    python -m multiverse_kernels.bench --sweep all --json report.json --plot docs/img   # sweeps, JSON, PNG

For each method it prints the time of one step, its ratio to the fastest peer, and the KV bytes it
read from the cache next to the forest's unique KV bytes (the lower bound: every visible page once),
and its share of the machine's roofline, max(unique KV bytes / read bandwidth, step flops / fp32 GEMM
rate), both rates measured in the same run (multiverse_kernels/roofline.py). On the CPU a header line
names the CPU model, the ISA the C++ kernel dispatched to and the thread count, and each table is
followed by the CPU kernel's time with 1 thread and with all threads. Forests: multiverse and
sampling16 (decode), extend (speculative verification, q_len 16 per branch).

Methods: every ``tree_attention`` backend available for the device (``auto`` first), and the peers a
user would otherwise pick: dense-mask SDPA (K/V gathered once, an L x rows mask), FlexAttention
(compiled, node-level ``mask_mod``), and a per-branch paged decode (each group attends its own full
page list, as SGLang/vLLM run Multiverse paths today).

KV bytes are measured, not derived: a backend that registers a ``tree_attention_kv_bytes`` hook counts
its own loads; for PyTorch-level methods a dispatch mode tallies the bytes every aten op reads from
tensors that alias the cache storage (index ops count the elements they fetch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from . import roofline
from .backends import _IMPLS, available_backends, resolve
from .dense_mask import dense_mask, key_slots
from .forest import KVForest
from .gpu_timing import flush_caches
from .metadata import ForestMetadata
from .ops.tree_attention import tree_attention

__all__ = ["main", "build_forest", "CacheReadCounter", "run_bench"]

_aten = torch.ops.aten
_VIEW_OPS = {
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.transpose.int,
    _aten.permute.default, _aten.slice.Tensor, _aten.select.int, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.expand.default, _aten.as_strided.default, _aten.alias.default,
    _aten.t.default, _aten.detach.default, _aten.unbind.int, _aten.split.Tensor,
    _aten.lift_fresh.default,
}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_select.default, _aten.gather.default,
              _aten.embedding.default}


class CacheReadCounter(TorchDispatchMode):
    """Tally the bytes aten ops read from tensors whose storage is one of ``caches``.

    Views read nothing; index/gather ops read what they return; any other op reads its whole argument.
    """

    def __init__(self, *caches: Tensor) -> None:
        super().__init__()
        self._ptrs = {c.untyped_storage().data_ptr() for c in caches}
        self.bytes = 0

    def _is_cache(self, t: object) -> bool:
        return isinstance(t, Tensor) and t.untyped_storage().data_ptr() in self._ptrs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = list(args) + list(kwargs.values())
        flat = [x for a in flat for x in (a if isinstance(a, (list, tuple)) else [a])]
        hits = [a for a in flat if self._is_cache(a)]
        if hits and func not in _VIEW_OPS:
            if func in _INDEX_OPS:
                self.bytes += out.numel() * out.element_size()
            else:
                self.bytes += sum(a.numel() * a.element_size() for a in hits)
        return out


# ---------------------------------------------------------------------------------------------- forests
@dataclass
class Workload:
    name: str
    forest: KVForest
    meta: ForestMetadata
    q: Tensor
    k_cache: Tensor
    v_cache: Tensor

    @property
    def unique_kv_bytes(self) -> int:
        """K+V bytes of every token some row sees, each once (the step's lower bound)."""
        lens = self.meta.node_len.long()
        seen = torch.zeros(self.meta.num_nodes, dtype=torch.bool)
        q_lens = self.meta.q_lens().long()
        gid = torch.repeat_interleave(torch.arange(self.meta.num_groups),
                                      (self.meta.vis_indptr[1:] - self.meta.vis_indptr[:-1]).long())
        seen[self.meta.vis_nodes.long()[q_lens[gid] > 0]] = True
        per_tok = 2 * self.k_cache.shape[2] * self.k_cache.shape[3] * self.k_cache.element_size()
        return int(lens[seen].sum()) * per_tok


def build_forest(name: str, page_size: int = 16) -> tuple[KVForest, list[tuple[int, int]]]:
    """The benchmark forests (one decode step each).

    multiverse: prefix 4096, 8 paths x 512, a conclusion (32 tokens so far) joining them; the 8 paths
                and the conclusion each decode one token (9 rows).
    sampling16: a 4096-token prompt and 16 samples x 256 tokens, each decoding one token (16 rows).
    extend:     speculative verification: a 4096-token prompt and 8 branches of 16 draft tokens, each
                branch verifying its 16 tokens at once (q_len 16, causal within the branch: 128 rows).
    """
    f = KVForest(4096, page_size)
    if name == "multiverse":
        root = f.new_sequence(4096)
        paths = f.fork(root, 8)
        for p in paths:
            f.append(p, 512)
        concl = f.join(paths)
        f.append(concl, 32)
        return f, [(p, 1) for p in paths] + [(concl, 1)]
    if name == "sampling16":
        root = f.new_sequence(4096)
        kids = f.fork(root, 16)
        for k in kids:
            f.append(k, 256)
        return f, [(k, 1) for k in kids]
    if name == "extend":
        root = f.new_sequence(4096)
        kids = f.fork(root, 8)
        for k in kids:
            f.append(k, 16)
        return f, [(k, 16) for k in kids]
    raise ValueError(f"forest: expected 'multiverse', 'sampling16' or 'extend', got {name!r}")


def make_workload(name: str, device: str, dtype: torch.dtype, hq: int = 32, hk: int = 8, d: int = 128,
                  page_size: int = 16, seed: int = 0) -> Workload:
    f, groups = build_forest(name, page_size)
    meta = f.metadata(groups).to(device)
    g = torch.Generator().manual_seed(seed)
    used = f.num_pages - f.num_free_pages
    shape = (used, page_size, hk, d)  # the pool is allocated densely from page 0
    k = torch.randn(shape, generator=g).to(device, dtype)
    v = torch.randn(shape, generator=g).to(device, dtype)
    q = torch.randn(meta.total_q, hq, d, generator=g).to(device, dtype)
    return Workload(name, f, meta, q, k, v)


# ---------------------------------------------------------------------------------------------- peers
def dense_sdpa_peer(w: Workload) -> Callable[[], Tensor]:
    """Dense-mask SDPA: gather every forest token once, one SDPA with a [rows, L] bool mask (built once
    per step outside the timed region, as it would be reused by every layer)."""
    mask = dense_mask(w.meta)
    slots = key_slots(w.meta)
    hq, hk = w.q.shape[1], w.k_cache.shape[2]

    def run() -> Tensor:
        k = w.k_cache.reshape(-1, hk, w.k_cache.shape[-1])[slots].transpose(0, 1)
        v = w.v_cache.reshape(-1, hk, w.v_cache.shape[-1])[slots].transpose(0, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            w.q.transpose(0, 1), k, v, attn_mask=mask, enable_gqa=hq != hk)
        return out.transpose(0, 1)

    return run


def flex_peer(w: Workload) -> Callable[[], Tensor]:
    """Compiled FlexAttention over the gathered forest with a node-level mask_mod: key t belongs to
    node kv_node[t]; row r sees it if its group lists that node (a [groups, nodes] table), causally
    within its own node."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    m = w.meta
    dev = w.q.device
    slots = key_slots(m)
    lens = m.node_len.long()
    kv_node = torch.repeat_interleave(torch.arange(m.num_nodes, device=dev), lens)
    kv_pos = torch.arange(slots.numel(), device=dev) - (torch.cumsum(lens, 0) - lens)[kv_node]
    q_lens = m.q_lens().long()
    row_group = torch.repeat_interleave(torch.arange(m.num_groups, device=dev), q_lens)
    own = m.own_nodes()
    row_i = torch.arange(m.total_q, device=dev) - m.qo_indptr.long()[row_group]
    row_limit = lens[own[row_group]] - q_lens[row_group] + row_i  # last visible own position
    table = torch.zeros(m.num_groups, m.num_nodes, dtype=torch.bool, device=dev)
    gid = torch.repeat_interleave(torch.arange(m.num_groups, device=dev),
                                  (m.vis_indptr[1:] - m.vis_indptr[:-1]).long())
    table[gid, m.vis_nodes.long()] = True
    row_own = own[row_group]

    def mask_mod(b, h, qi, ki):
        n = kv_node[ki]
        visible = table[row_group[qi], n]
        return visible & ((n != row_own[qi]) | (kv_pos[ki] <= row_limit[qi]))

    block_mask = create_block_mask(mask_mod, None, None, m.total_q, slots.numel(), device=dev)
    flex = torch.compile(flex_attention)
    hk = w.k_cache.shape[2]

    def gather() -> tuple[Tensor, Tensor]:
        k = w.k_cache.reshape(-1, hk, w.k_cache.shape[-1])[slots].transpose(0, 1)[None]
        v = w.v_cache.reshape(-1, hk, w.v_cache.shape[-1])[slots].transpose(0, 1)[None]
        return k, v

    def run() -> Tensor:
        k, v = gather()
        out = flex(w.q.transpose(0, 1)[None], k, v, block_mask=block_mask, enable_gqa=True)
        return out[0].transpose(0, 1)

    run.cache_reads = gather  # the compiled kernel reads only the gathered copy
    return run


def per_branch_peer(w: Workload) -> Callable[[], Tensor]:
    """Per-branch paged decode: each group is its own request over its full page list (prefix
    re-read by every branch), attention over the gathered list."""
    m = w.meta
    hq, hk = w.q.shape[1], w.k_cache.shape[2]
    qo, vi, vis = m.qo_indptr.tolist(), m.vis_indptr.tolist(), m.vis_nodes.tolist()
    reqs = []
    for g in range(m.num_groups):
        if qo[g + 1] == qo[g]:
            continue
        slots = torch.cat([m.node_token_slots(n) for n in vis[vi[g]:vi[g + 1]]])
        ql = qo[g + 1] - qo[g]
        L = slots.numel()
        ar = torch.arange(L, device=slots.device)
        causal = ar[None] <= (L - ql + ar[:ql])[:, None]
        reqs.append((qo[g], qo[g + 1], slots, causal))

    def run() -> Tensor:
        out = torch.empty_like(w.q)
        kf = w.k_cache.reshape(-1, hk, w.k_cache.shape[-1])
        vf = w.v_cache.reshape(-1, hk, w.v_cache.shape[-1])
        for q0, q1, slots, causal in reqs:
            o = torch.nn.functional.scaled_dot_product_attention(
                w.q[q0:q1].transpose(0, 1), kf[slots].transpose(0, 1), vf[slots].transpose(0, 1),
                attn_mask=causal, enable_gqa=hq != hk)
            out[q0:q1] = o.transpose(0, 1)
        return out

    return run


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2,
            flush: bool = True) -> float:
    """Median seconds per call. On CUDA: CUDA-graph replays timed by CUDA events with the L2 flushed
    before each (:mod:`multiverse_kernels.gpu_timing`); elsewhere host wall-clock around each call, the
    caches flushed before each (:func:`multiverse_kernels.gpu_timing.flush_caches`; ``flush=False``: warm,
    back-to-back calls, for comparison only)."""
    if torch.device(device).type == "cuda":
        from .gpu_timing import time_cuda

        return time_cuda(fn, device, iters, warmup, flush_l2=flush)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if flush:
            flush_caches(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, iters: int = 5) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, iters)
    return 2 * nbytes / t


def _measure_bytes(fn: Callable[[], object], w: Workload) -> int:
    with CacheReadCounter(w.k_cache, w.v_cache) as c:
        fn()
    return c.bytes


@dataclass
class Row:
    method: str
    seconds: float | None
    kv_bytes: int | None
    note: str = ""
    roof_share: float | None = None  # median of the per-round roofline shares (run_bench's rounds)
    fma_share: float | None = None  # same against the FMA peak


def run_bench(forest: str, device: str, dtype: torch.dtype, iters: int,
              backends: list[str] | None, peers: bool = True,
              rounds: int = 5) -> tuple[Workload, list[Row], float]:
    """Time every method on one forest in ``rounds`` interleaved rounds (roofline.paired_rounds): each
    round measures the machine's rates (short runs) and then times every method for
    ``ceil(iters / rounds)`` calls. A method's time is the median over rounds and its roofline share the
    median of its per-round shares, so that a method and its roof, and the methods among themselves, are
    compared on the same machine state (a shared VM drifts by tens of percent within a minute)."""
    w = make_workload(forest, device, dtype)
    dev = w.q.device
    scale = w.q.shape[-1] ** -0.5
    names = backends or available_backends("tree_attention", dev)
    if device == "cpu":  # the Triton interpreter is a correctness tool, not a CPU backend
        names = [b for b in names if b != "triton"]
    timed: list[tuple[Row, Callable[[], object]]] = []
    rows: list[Row] = []
    for b in names:
        fn = lambda b=b: tree_attention(w.q, w.k_cache, w.v_cache, w.meta, backend=b, validate=False)
        hook = _IMPLS.get("tree_attention_kv_bytes", {}).get(b)
        if hook is not None and dev.type in hook[1]:
            kv = int(resolve("tree_attention_kv_bytes", b, dev)(
                w.q, w.k_cache, w.v_cache, w.meta, scale))
            note = "kernel's own load counter"
        else:  # run the implementation itself under the tally (the custom op is opaque to it)
            impl = resolve("tree_attention", b, dev)
            kv = _measure_bytes(lambda impl=impl: impl(w.q, w.k_cache, w.v_cache, w.meta, scale), w)
            note = "aten-level read tally"
        row = Row(f"tree_attention[{b}]", None, kv, note)
        rows.append(row)
        timed.append((row, fn))
    if peers:
        for name, make in (("dense-mask SDPA", dense_sdpa_peer), ("FlexAttention (compiled)", flex_peer),
                           ("per-branch paged decode", per_branch_peer)):
            try:
                fn = make(w)
                time_fn(fn, dev, 1)  # compiles (Flex) and fails here if the peer cannot run
            except Exception as e:  # report a peer that cannot run here instead of dying
                rows.append(Row(name, None, None, f"unavailable: {type(e).__name__}: {str(e)[:80]}"))
                continue
            row = Row(name, None, _measure_bytes(getattr(fn, "cache_reads", fn), w), "aten-level read tally")
            rows.append(row)
            timed.append((row, fn))
    per_round = max(1, -(-iters // max(1, rounds)))
    # A warm-up call in every round (two in the first): the round's rate measurement ran in between,
    # and with two timed calls per round a method's first call after it (threads woken, the previous
    # method's allocations returned) weighed half of that round's median.
    timers = [lambda i, fn=fn: time_fn(fn, dev, per_round, warmup=2 if i == 0 else 1) for _, fn in timed]
    paired = roofline.paired_rounds(w.meta, tuple(w.q.shape), w.k_cache.shape[2], w.unique_kv_bytes, timers,
                                    dev, rounds)
    for (row, _), r in zip(timed, paired, strict=True):
        row.seconds, row.roof_share, row.fma_share = r.seconds, r.roof_share, r.fma_share
    return w, rows, copy_bandwidth(dev)


def format_table(w: Workload, rows: list[Row], bw: float, rates: roofline.MachineRates | None = None) -> str:
    """The main table; with ``rates`` also each method's share of the roofline (multiverse_kernels/
    roofline.py: max(unique KV bytes / read bandwidth, step flops / fp32 GEMM rate)) and of the FMA peak:
    the rows' per-round medians when run_bench measured them (``Row.roof_share``), else from ``rates``
    (which then also give the header's roofline line)."""
    uniq = w.unique_kv_bytes
    roof = fma_roof = None
    if rates is not None:
        roof, flops = roofline.workload_roofline(w.meta, tuple(w.q.shape), w.k_cache.shape[2], uniq, rates)
        if rates.fma_flops:  # the step's flops at the FMA peak (the hard compute ceiling)
            fma_roof = flops / rates.fma_flops
    peer_times = [r.seconds for r in rows if r.seconds and not r.method.startswith("tree_attention")]
    best_peer = min(peer_times) if peer_times else None
    m = w.meta
    lines = [
        f"forest {w.name}: {m.num_nodes} nodes, {m.num_groups} groups, {m.total_q} query rows, "
        f"{int(m.node_len.sum())} tokens; q heads {w.q.shape[1]}, kv heads {w.k_cache.shape[2]}, "
        f"head_dim {w.q.shape[2]}, {w.q.dtype}, page size {m.page_size}, device {w.q.device}",
        f"unique KV bytes (lower bound): {uniq / 1e6:.2f} MB; measured copy bandwidth "
        f"{bw / 1e9:.1f} GB/s",
        *([roofline.describe_roofline(uniq, flops, rates)] if roof is not None else []),
        *(["times: median over interleaved rounds; % roofline / % FMA peak: median of each round's share, "
           "the rates measured at the start of that round"] if any(r.roof_share for r in rows) else []),
        "",
        f"{'method':<34}{'time ms':>10}{'speedup vs best peer':>22}{'KV MB read':>12}{'x unique':>10}"
        f"{'uniqKV GB/s':>13}{'% copy BW':>11}{'% roofline' if roof is not None else '':>12}"
        f"{'% FMA peak' if fma_roof is not None else '':>12}  note",
    ]
    for r in rows:
        t = f"{r.seconds * 1e3:10.3f}" if r.seconds else f"{'-':>10}"
        sp = f"{best_peer / r.seconds:21.2f}x" if r.seconds and best_peer else f"{'-':>22}"
        kv = f"{r.kv_bytes / 1e6:12.2f}{r.kv_bytes / uniq:10.2f}" if r.kv_bytes is not None else \
            f"{'-':>12}{'-':>10}"
        gbs = f"{uniq / r.seconds / 1e9:13.2f}{100 * uniq / r.seconds / bw:10.1f}%" if r.seconds else \
            f"{'-':>13}{'-':>11}"
        rs = r.roof_share if r.roof_share is not None else roof / r.seconds if roof and r.seconds else None
        fs = r.fma_share if r.fma_share is not None else \
            fma_roof / r.seconds if fma_roof and r.seconds else None
        rf = "" if roof is None else f"{100 * rs:11.1f}%" if rs else f"{'-':>12}"
        fm = "" if fma_roof is None else f"{100 * fs:11.1f}%" if fs else f"{'-':>12}"
        lines.append(f"{r.method:<34}{t}{sp}{kv}{gbs}{rf}{fm}  {r.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multiverse_kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forest", choices=["multiverse", "sampling16", "extend", "all", "none"], default="all",
                   help="main tables to print (none: only the sweeps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--backend", action="append", help="tree_attention backends to time (default: all "
                   "available for the device)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-peers", action="store_true")
    from . import bench_sweep  # sweeps, JSON and plots (multiverse_kernels/bench_sweep.py)

    bench_sweep.add_arguments(p)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if a.device.startswith("cuda")
                                                     else torch.float32)
    torch.manual_seed(0)
    print(f"multiverse_kernels benchmark | torch {torch.__version__} | device {a.device} | "
          f"auto backend: {available_backends('tree_attention', torch.device(a.device))[0]} | "
          f"{torch.get_num_threads()} threads")
    if a.device == "cpu":
        print(roofline.describe_cpu())
    tables = []
    forests = {"all": ["multiverse", "sampling16", "extend"], "none": []}.get(a.forest, [a.forest])
    for forest in forests:
        w, rows, bw = run_bench(forest, a.device, dtype, a.iters, a.backend, not a.no_peers)
        print()
        print(format_table(w, rows, bw, roofline.rates_for_run(a.device, refresh=True)))
        if a.device == "cpu" and "cpu" in (a.backend or available_backends("tree_attention", "cpu")):
            fn = lambda w=w: tree_attention(w.q, w.k_cache, w.v_cache, w.meta, backend="cpu", validate=False)
            print(roofline.thread_scaling(w.meta, tuple(w.q.shape), w.k_cache.shape[2], w.unique_kv_bytes,
                                          {"tree_attention[cpu]": fn},
                                          lambda f: time_fn(f, torch.device("cpu"), a.iters)))
        sys.stdout.flush()
        tables.append(bench_sweep.table_record(w, rows, bw))
    bench_sweep.main_hook(a, dtype, tables, sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
