"""Training speed and memory: forward + backward of packed tree attention vs the dense-mask recipe.

    python benchmarks/training.py                                   # L = 4K..32K, fp32 and bf16
    python benchmarks/training.py --lengths 8448 --dtypes float32   # the issue's shape only
    python benchmarks/training.py --lengths 4224,8448,16896,33792,67584 --mem-budget-gib 16

One packed Multiverse training sample per length L (every node its own group, q_len = node_len,
contiguous K/V as a page-size-1 cache): a trunk of L/2 tokens, 4 paths of L/8, a conclusion of L/32
joining them (L = 8448: trunk 4096, 4 x 1024, 256); 8 query / 2 KV heads, head_dim 64. Methods, side by
side in one run:

* ``tree_attention[<backend>]``: ``multiverse_kernels.tree_attention`` with that backend (forward) and
  its autograd backward (the fused C++ backward for ``cpu``; the blocked reference backward for
  ``reference``, run only up to ``--max-reference-len``); triton needs a GPU and is listed as skipped
  on a CPU-only machine.
* ``dense-mask SDPA``: the Multiverse recipe, ``dense_mask(meta)`` (L x L bool) +
  ``scaled_dot_product_attention`` with GQA, forward + backward; skipped (and said so) where its
  memory, extrapolated quadratically from the largest length measured, exceeds ``--mem-budget-gib``.
* ``flex (compiled)``: ``torch.compile(flex_attention)`` with a block mask from the same forest. On
  CPU its backward is attempted; where it raises, the row is forward only and says so.

Every (method, dtype, L) runs in a fresh process: inputs are built, one warm-up step runs (compilation,
plan, thread pool), then the process's peak RSS is reset (``/proc/self/clear_refs``) and one measured
step runs; "peak MiB" is the peak RSS growth over the resident memory before that step, with glibc
made to return large blocks to the OS (``MALLOC_MMAP_THRESHOLD_``) so freed warm-up memory cannot hide
a step's. Time is the minimum over ``--repeats`` steps. "MiB/1K tok" divides the peak by L / 1000: a
flat column is memory linear in L.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("tree_attention[cpu]", "tree_attention[reference]", "tree_attention[triton]", "dense-mask SDPA",
           "flex (compiled)")


def _forest(L: int):
    import multiverse_kernels as mk

    trunk_len, path_len, concl_len = L * 16 // 33, L * 4 // 33, L // 33
    n = trunk_len + 4 * path_len + concl_len
    f = mk.KVForest(n, 1)
    trunk = f.new_sequence(trunk_len)
    kids = f.fork(trunk, 4)
    for kid in kids:
        f.append(kid, path_len)
    c = f.join(kids)
    f.append(c, concl_len)
    return f.metadata([(trunk, trunk_len)] + [(kid, path_len) for kid in kids] + [(c, concl_len)])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _child(a: argparse.Namespace) -> dict:
    import torch

    import multiverse_kernels as mk

    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    meta = _forest(a.L)
    L = meta.total_q
    g = torch.Generator().manual_seed(0)
    q = torch.randn(L, 8, 64, generator=g).to(dtype)
    k = torch.randn(L, 1, 2, 64, generator=g).to(dtype)
    v = torch.randn(L, 1, 2, 64, generator=g).to(dtype)
    go = torch.randn(L, 8, 64, generator=g).to(dtype)
    note = ""

    if a.method.startswith("tree_attention"):
        backend = a.method[len("tree_attention["):-1]

        def step():
            ins = [t.detach().requires_grad_() for t in (q, k, v)]
            mk.tree_attention(*ins, meta, backend=backend).backward(go)
    elif a.method == "dense-mask SDPA":
        k3, v3 = k.reshape(L, 2, 64), v.reshape(L, 2, 64)

        def step():
            ins = [t.detach().requires_grad_() for t in (q, k3, v3)]
            mask = mk.dense_mask(meta)  # part of the recipe: built per sample
            out = torch.nn.functional.scaled_dot_product_attention(
                *(t.transpose(0, 1) for t in ins), attn_mask=mask, enable_gqa=True)
            out.backward(go.transpose(0, 1))
    else:  # flex
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        slots = mk.key_slots(meta)  # page size 1, contiguous: key j is token j
        node = torch.repeat_interleave(torch.arange(meta.num_groups), meta.qo_indptr.diff().long())
        vis = torch.zeros(meta.num_groups, meta.num_groups, dtype=torch.bool)
        vi, vn = meta.vis_indptr.tolist(), meta.vis_nodes.tolist()
        for gi in range(meta.num_groups):  # group gi's own node is node gi here (packed training)
            vis[gi, vn[vi[gi]:vi[gi + 1]]] = True
        assert bool((slots == torch.arange(L)).all())

        def mask_mod(b, h, qi, kv):
            same = node[qi] == node[kv]
            return vis[node[qi], node[kv]] & (~same | (kv <= qi))

        bm = create_block_mask(mask_mod, None, None, L, L, device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)
        k3, v3 = (t.reshape(L, 2, 64).transpose(0, 1)[None] for t in (k, v))
        q3 = q.transpose(0, 1)[None]
        backward = True

        def step():
            nonlocal backward
            ins = [t.detach().requires_grad_(backward) for t in (q3, k3, v3)]
            out = flex(*ins, block_mask=bm, enable_gqa=True)
            if backward:
                out.backward(go.transpose(0, 1)[None])

        try:
            step()
        except Exception as e:  # noqa: BLE001 - any failure of the backward: forward only, said so
            backward = False
            note = f"forward only: backward raised {type(e).__name__}"
    step()  # warm-up (compilation, plan, threads)
    reset = _reset_peak()
    base = _rss_kib("VmRSS") if reset else _rss_kib("VmHWM")
    t0 = time.perf_counter()
    step()
    best = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    for _ in range(a.repeats - 1):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    if not reset:
        note = (note + "; " if note else "") + "peak not reset: includes warm-up"
    return {"seconds": best, "peak_mib": (peak - base) / 1024, "note": note, "L": L}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4224,8448,16896,33792",
                   help="comma-separated packed lengths L (4K..32K by default; add 67584 for 64K)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mem-budget-gib", type=float, default=6.0,
                   help="skip dense-mask SDPA where its extrapolated peak exceeds this")
    p.add_argument("--max-reference-len", type=int, default=8448,
                   help="longest L for the (slow, Python-loop) reference backend")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        c = argparse.Namespace(**json.loads(a.child))
        print(json.dumps(_child(c)))
        return

    import torch

    from multiverse_kernels.backends import available_backends
    from multiverse_kernels.info import cpu_isa

    cpu_backends = available_backends("tree_attention", "cpu")
    lengths = [int(x) for x in a.lengths.split(",")]
    dtypes = a.dtypes.split(",")
    methods = a.methods.split(",")
    cpu = cpu_isa()
    print(f"machine: {cpu['model']} ({cpu['isa_level']}; cpu kernel {cpu['kernel_isa']}), {os.cpu_count()} "
          f"cores, {a.threads} threads; torch {torch.__version__}")
    print("shape: packed Multiverse sample, trunk L/2, 4 paths of L/8, conclusion L/32; 8 q / 2 KV heads, "
          "head_dim 64; forward + backward")
    print(f"{'method':<28}{'dtype':<10}{'L':>7}{'seconds':>10}{'peak MiB':>10}{'MiB/1K tok':>12}"
          f"{'vs dense':>10}  note")
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    for dtype in dtypes:
        dense_fit: tuple[int, float] | None = None  # (L, peak MiB) of the largest dense run
        for L in lengths:
            dense_s = None
            for method in methods:
                r: dict = {"method": method, "dtype": dtype, "L": L}
                skip = None
                if method.startswith("tree_attention"):
                    backend = method[len("tree_attention["):-1]
                    if backend not in cpu_backends:
                        skip = f"skipped: {backend} backend not available for CPU tensors" + (
                            " (needs a GPU)" if backend == "triton" else "")
                    elif backend == "reference" and L > a.max_reference_len:
                        skip = f"skipped: reference above --max-reference-len {a.max_reference_len}"
                if method == "dense-mask SDPA" and dense_fit is not None:
                    est = dense_fit[1] * (L / dense_fit[0]) ** 2 / 1024
                    if est > a.mem_budget_gib:
                        skip = (f"skipped: does not fit (extrapolated {est:.1f} GiB > --mem-budget-gib "
                                f"{a.mem_budget_gib:g})")
                if skip is None:
                    arg = json.dumps({"method": method, "dtype": dtype, "L": L, "threads": a.threads,
                                      "repeats": a.repeats})
                    proc = subprocess.run([sys.executable, __file__, "--child", arg], capture_output=True,
                                          text=True, env=env)
                    if proc.returncode != 0:
                        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                        skip = f"failed (rc {proc.returncode}): {err[:120]}"
                    else:
                        r.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                if skip is not None:
                    r["note"] = skip
                    r["seconds"] = r["peak_mib"] = None
                if method == "dense-mask SDPA" and r["seconds"] is not None:
                    dense_s = r["seconds"]
                    dense_fit = (L, r["peak_mib"])
                rows.append(r)
            for r in rows:
                if r["dtype"] != dtype or r["L"] != L:
                    continue
                sec, mib = r.get("seconds"), r.get("peak_mib")
                ratio = ""
                if sec and dense_s and r["method"] != "dense-mask SDPA":
                    ratio = f"{dense_s / sec:.2f}x"
                secs = "" if sec is None else f"{sec:.3f}"
                peak = "" if mib is None else f"{mib:.0f}"
                per = "" if mib is None else f"{mib / (L / 1000):.1f}"
                print(f"{r['method']:<28}{dtype:<10}{L:>7}{secs:>10}{peak:>10}{per:>12}{ratio:>10}  "
                      f"{r.get('note', '')}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
