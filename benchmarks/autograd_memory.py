"""Peak memory and time of tree_attention forward + backward on a packed Multiverse-shaped sequence.

    python benchmarks/autograd_memory.py                       # L = 6400, reference and cpu forwards
    python benchmarks/autograd_memory.py --trunk 8192 --path 4096

Packed training: a trunk, two paths and a conclusion joining them, every node its own group with
q_len = node_len, K/V contiguous as a page-size-1 cache; 8 query / 2 KV heads, head dim 64, float32,
one thread. Each configuration runs in a fresh process and reports the growth of the peak RSS
(ru_maxrss) over the inputs, so the numbers include the forward's and backward's temporaries only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _child(args: argparse.Namespace) -> None:
    import torch

    import multiverse_kernels as mk

    torch.set_num_threads(1)
    f = mk.KVForest(args.trunk + 2 * args.path + args.concl, 1)
    trunk = f.new_sequence(args.trunk)
    a, b = f.fork(trunk, 2)
    f.append(a, args.path)
    f.append(b, args.path)
    c = f.join([a, b])
    f.append(c, args.concl)
    meta = f.metadata([(trunk, args.trunk), (a, args.path), (b, args.path), (c, args.concl)])
    L = meta.total_q
    g = torch.Generator().manual_seed(0)
    q = torch.randn(L, 8, 64, generator=g, requires_grad=True)
    k = torch.randn(L, 1, 2, 64, generator=g, requires_grad=True)
    v = torch.randn(L, 1, 2, 64, generator=g, requires_grad=True)
    grad = torch.randn(L, 8, 64, generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.mode == "save-forward":  # out/lse for the backward-only run, made in another process
        with torch.no_grad():
            torch.save(mk.tree_attention(q, k, v, meta, return_lse=True, backend="cpu"), args.state)
        return
    if args.mode == "backward-only":  # the forward ran elsewhere, so the peak is the backward's own
        out, lse = torch.load(args.state)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        mk.ops.tree_attention_backward(grad, q.detach(), k.detach(), v.detach(), out, lse, meta)
    else:
        mk.tree_attention(q, k, v, meta, backend=args.mode).backward(grad)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"L": L, "mode": args.mode, "rss_growth_mib": (peak - base) / 1024, "seconds": dt}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trunk", type=int, default=4096)
    p.add_argument("--path", type=int, default=1024)
    p.add_argument("--concl", type=int, default=256)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        _child(a)
        return
    state = os.path.join(tempfile.mkdtemp(), "forward.pt")
    base_cmd = [sys.executable, __file__, "--trunk", str(a.trunk), "--path", str(a.path), "--concl",
                str(a.concl), "--state", state]
    subprocess.run(base_cmd + ["--mode", "save-forward"], check=True, capture_output=True)
    print(f"{'method':<24}{'L':>8}{'peak RSS growth MiB':>22}{'seconds':>10}")
    for mode in ("reference", "cpu", "backward-only"):
        r = json.loads(subprocess.run(base_cmd + ["--mode", mode], check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1])
        label = {"reference": "reference fwd + bwd", "cpu": "cpu fwd + bwd",
                 "backward-only": "backward alone"}[mode]
        print(f"{label:<24}{r['L']:>8}{r['rss_growth_mib']:>22.0f}{r['seconds']:>10.2f}")


if __name__ == "__main__":
    main()
