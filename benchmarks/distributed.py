"""Context-parallel tree attention: bytes sent per rank and time, ours vs all-gather vs a dense ring.

    python benchmarks/distributed.py --json out.json             # 2 gloo processes, 1 thread each
    python benchmarks/distributed.py --world 3 --ranges balanced

Spawns ``--world`` processes on this machine (gloo, one torch thread each). For each workload (a 32K
packed Multiverse sample: trunk L/2, 4 paths of L/8, a conclusion of L/32 joining them; a GRPO row with
G = 16 completions of 1,792 tokens after a 4,096-token prompt, L = 32,768) every rank holds its token
range of q/k/v and runs one forward + backward (loss = sum(out * w)) of attention over the whole packed
forest, three ways that differ only in what moves (the local compute is the same forest and kernel):

* ``ours``: ``multiverse_kernels.distributed.tree_attention``: one all-to-all of the K/V token slices of
  the nodes the rank's rows see (computed from the shared metadata), the own K/V attended while they are
  in flight, partial states merged; backward: the fetched tokens' dK/dV all-to-all'ed back to owners.
* ``all-gather``: every rank's K/V to every rank (an all-to-all carrying the own block to each peer),
  then attention over the whole cache; backward: each peer's dK/dV slice back to it (reduce-scatter).
* ``dense ring``: ring attention's traffic: the K/V blocks passed around the ring N - 1 times (each hop
  the block received last), then attention; backward: a ring reduce-scatter of dK/dV (N - 1 hops).

Columns: bytes this rank sent (forward, backward; counted in the exchange layers from the tensors
handed to gloo), the step's time (max over ranks, one measured step after a warm-up), and the K/V bytes
a rank holds for its attention (own + received). A markdown table and the formulas for N ranks are
printed; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import multiverse_kernels as mk
from multiverse_kernels.distributed import (
    balanced_token_ranges,
    even_token_ranges,
    exchange_stats,
    reset_exchange_stats,
    tree_attention,
)
from multiverse_kernels.distributed._plan import host_forest, needed_intervals, rank_plan
from multiverse_kernels.rl import pack_group


def _packed(lens: list[int], vis: list[list[int]]) -> mk.ForestMetadata:
    i32 = dict(dtype=torch.int32)
    ip = [0]
    for n in lens:
        ip.append(ip[-1] + n)
    vip = [0]
    for v in vis:
        vip.append(vip[-1] + len(v))
    ipt = torch.tensor(ip, **i32)
    return mk.ForestMetadata(ipt, torch.arange(ip[-1], **i32), torch.tensor(lens, **i32), ipt.clone(),
                             torch.tensor(vip, **i32), torch.tensor([x for v in vis for x in v], **i32), 1)


def workload(name: str) -> mk.ForestMetadata:
    if name == "multiverse-32K":  # benchmarks/training.py's sample at L = 33,792
        L = 33792
        t, p, c = L * 16 // 33, L * 4 // 33, L // 33
        return _packed([t, p, p, p, p, c], [[0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 1, 2, 3, 4, 5]])
    if name == "grpo-G16":
        return pack_group(list(range(4096)), [[1] * 1792 for _ in range(16)]).metadata()
    raise SystemExit(f"unknown workload {name}")


# ------------------------------------------------------------------------------------ baselines
_BYTES = {"fwd": 0, "bwd": 0}


def _a2a(send: torch.Tensor, send_splits: list[int], recv_splits: list[int], key: str) -> torch.Tensor:
    me = dist.get_rank()
    row = send[0].numel() * send.element_size() if send.shape[0] else 0
    _BYTES[key] += (sum(send_splits) - send_splits[me]) * row
    recv = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
    dist.all_to_all_single(recv, send, recv_splits, send_splits)
    return recv


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv: torch.Tensor, ranges: list) -> torch.Tensor:
        N = dist.get_world_size()
        n = kv.shape[0]
        ctx.ranges = ranges
        return _a2a(torch.cat([kv] * N), [n] * N, [b - a for a, b in ranges], "fwd")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        me = dist.get_rank()
        lens = [b - a for a, b in ctx.ranges]
        got = _a2a(g.contiguous(), lens, [lens[me]] * len(lens), "bwd")
        return got.view(len(lens), lens[me], *g.shape[1:]).sum(0), None


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv: torch.Tensor, ranges: list) -> torch.Tensor:
        N, r = dist.get_world_size(), dist.get_rank()
        ctx.ranges = ranges
        blocks = {r: kv}
        for t in range(N - 1):
            out_b, in_b = (r - t) % N, (r - t - 1) % N
            a, b = ranges[in_b]
            buf = kv.new_empty((b - a,) + tuple(kv.shape[1:]))
            send = blocks[out_b].contiguous()
            _BYTES["fwd"] += send.numel() * send.element_size()
            ops = [dist.P2POp(dist.isend, send, (r + 1) % N), dist.P2POp(dist.irecv, buf, (r - 1) % N)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            blocks[in_b] = buf
        return torch.cat([blocks[i] for i in range(N)])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        N, r = dist.get_world_size(), dist.get_rank()
        acc = {i: g[a:b].clone() for i, (a, b) in enumerate(ctx.ranges)}
        for t in range(N - 1):  # ring reduce-scatter: after N - 1 hops rank r holds the sum of block r
            out_c, in_c = (r - t - 1) % N, (r - t - 2) % N
            buf = torch.empty_like(acc[in_c])
            send = acc[out_c].contiguous()
            _BYTES["bwd"] += send.numel() * send.element_size()
            ops = [dist.P2POp(dist.isend, send, (r + 1) % N), dist.P2POp(dist.irecv, buf, (r - 1) % N)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            acc[in_c] = acc[in_c] + buf
        return acc[r], None


def _full_cache_forest(meta: mk.ForestMetadata, ranges: list, rank: int) -> mk.ForestMetadata:
    """The rank's rows over the whole sequence's cache: ours' combined forest with pages remapped."""
    f = host_forest(meta)
    p = rank_plan(f, ranges, rank, torch.device("cpu"), forests=("combined",))
    s, e = ranges[rank]
    need = needed_intervals(f, s, e)
    table = torch.cat([torch.arange(s, e)] + [torch.arange(a, b) for a, b in need])
    pages = table[p.combined.node_page_indices.long()].to(torch.int32)
    return mk.ForestMetadata(p.combined.node_page_indptr, pages, *p.combined.tensors()[2:], page_size=1,
                             own_full=p.combined.own_full)


# --------------------------------------------------------------------------------------- worker
def _measure(name: str, rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    dt = getattr(torch, args.dtype)
    rows = []
    meta = workload(name)
    L = meta.total_q
    ranges = balanced_token_ranges(meta, world) if args.ranges == "balanced" else even_token_ranges(L, world)
    s, e = ranges[rank]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(L, args.hq, args.dim, generator=g)[s:e].to(dt)
    k = torch.randn(L, args.hk, args.dim, generator=g)[s:e].to(dt)
    v = torch.randn(L, args.hk, args.dim, generator=g)[s:e].to(dt)
    w = torch.randn(e - s, args.hq, args.dim, generator=g).to(dt)
    full_forest = _full_cache_forest(meta, ranges, rank)
    row = 2 * args.hk * args.dim * k.element_size()

    def ours():
        reset_exchange_stats()
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        out = tree_attention(ql, kl, vl, meta, token_ranges=ranges)
        (out * w).sum().backward()
        st = exchange_stats()
        held = (e - s + sum(b - a for a, b in needed_intervals(host_forest(meta), s, e))) * row
        return st["forward_bytes_sent"], st["backward_bytes_sent"], held

    def gathered(fn):
        def run():
            _BYTES["fwd"] = _BYTES["bwd"] = 0
            ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
            kv = fn.apply(torch.stack([kl, vl], 1), ranges)
            kc, vc = kv[:, 0].contiguous()[:, None], kv[:, 1].contiguous()[:, None]
            out = mk.tree_attention(ql, kc, vc, full_forest, validate=False)
            (out * w).sum().backward()
            return _BYTES["fwd"], _BYTES["bwd"], L * row
        return run

    for method, fn in (("ours", ours), ("all-gather", gathered(_AllGather)), ("dense ring", gathered(_Ring))):
        fn()  # warm-up: plans, thread pool
        dist.barrier()
        t0 = time.perf_counter()
        fwd_b, bwd_b, held = fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append(dict(workload=name, L=L, rank=rank, range=[s, e], method=method, fwd_bytes=fwd_b,
                         bwd_bytes=bwd_b, kv_held_bytes=held, step_s=float(t)))
    return rows


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    rows = [r for name in args.workloads.split(",") for r in _measure(name, rank, world, args)]
    gathered_rows: list = [None] * world
    dist.all_gather_object(gathered_rows, rows)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump([r for rs in gathered_rows for r in rs], fh)
    dist.destroy_process_group()


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores visible"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--workloads", default="multiverse-32K,grpo-G16")
    ap.add_argument("--ranges", choices=("even", "balanced"), default="balanced")
    ap.add_argument("--hq", type=int, default=4)
    ap.add_argument("--hk", type=int, default=1)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(args.world, f"file://{tmp}/rdv", args, out_path), nprocs=args.world)
        with open(out_path) as fh:
            rows = json.load(fh)
    N = args.world
    cmd = "python benchmarks/distributed.py " + " ".join(sys.argv[1:])
    print(f"machine: {_machine()}; {N} gloo processes, 1 torch thread each; torch {torch.__version__}")
    print(f"command: {cmd}")
    print(f"shape: {args.hq} q / {args.hk} KV heads, head_dim {args.dim}, {args.dtype}; ranges "
          f"{args.ranges}; one forward + backward\n")
    print("| workload | rank (tokens) | method | fwd MiB sent | bwd MiB sent | step s (max over ranks) "
          "| K/V held MiB |")
    print("|---|---|---|---|---|---|---|")
    mib = 1 / 2**20
    for r in rows:
        print(f"| {r['workload']} | {r['rank']} [{r['range'][0]}, {r['range'][1]}) | {r['method']} | "
              f"{r['fwd_bytes'] * mib:.2f} | {r['bwd_bytes'] * mib:.2f} | {r['step_s']:.2f} | "
              f"{r['kv_held_bytes'] * mib:.2f} |")
    print("""
Bytes one rank r with n_r tokens sends, N ranks, L tokens, row = 2 * Hk * D * dtype bytes (K and V):
  all-gather:  forward (N - 1) * n_r * row;  backward (reduce-scatter) (L - n_r) * row
  dense ring:  forward sum of the N - 1 blocks it forwards ~ (N - 1) * L/N * row; backward the same
  ours:        forward sum over ranks d != r of |need(d) & [s_r, e_r)| * row, need(d) = the tokens outside
               d's range that d's rows see (its nodes' slices; its own node only up to its last row);
               backward the same (dK/dV of exactly those tokens) -- never more than all-gather
K/V held per rank: all-gather and ring L * row (ring attention proper keeps 2 blocks, 2 * L/N * row, but
  recomputes); ours (n_r + |need(r)|) * row""")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(machine=_machine(), command=cmd, world=N, args=vars(args), rows=rows,
                           torch=torch.__version__, date=time.strftime("%Y-%m-%d")), fh, indent=1)


if __name__ == "__main__":
    main()
