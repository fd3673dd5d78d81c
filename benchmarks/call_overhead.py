"""What one ``tree_attention`` call costs beyond its kernel, layer by layer of the call, same process.

A decode step calls the op once per layer, so on a short step the per-call cost of the Python layers can
be as large as the kernel's. On a small forest (a lone sequence of ``--tokens`` tokens, one query row;
the main job's head counts) this times, warm (back-to-back calls, no cache flush: the per-call cost
itself, not the memory system), the median microseconds per call of:

* **op, validate=True**: ``tree_attention(...)`` as a user calls it by default (the metadata checks run
  once per step's metadata: ``plan_cache.validate_once``);
* **op, validate=False**: the hot-path call (eager inference calls skip torch's dispatcher:
  ``ops/_dispatch.py``, ``direct_call_ok``);
* **op, autograd**: the same with ``q.requires_grad`` (through the registered custom op and its autograd
  formula, as in training);
* **backend function**: ``backends.cpu.tree_attention`` (the plan-cache lookup, the C++ op);
* **C++ op**: ``torch.ops.multiverse_C.tree_attention_run`` on a precomputed plan (the kernel plus the
  binding: what the vLLM backend calls per layer);
* **step plan**: the plan the first layer of a step makes and the others reuse (tiny nodes absorbed,
  then the C++ planner: ``backends.cpu._run_plan(..., cached=False)``, as the vLLM backend calls it);
  paid once per step, not per layer;
* **block tables -> forest** (C++ and torch): the vLLM backend's other per-step cost, the sequence's
  block table (block size 32) turned into its forest (``integrations.vllm_sharing.
  forest_from_block_table``; C++ for CPU tables, torch for GPU ones).

Each row minus the C++ op's is the Python cost of that layer; the C++ op is the kernel's own floor at
this size. Then the same for ``append_paged_kv`` of the step's one new token (what an engine on our
paged cache calls per layer before the attention): the op with and without validation, and its C++ op
``torch.ops.multiverse_C.append_paged_kv``. Command (from the repository root)::

    python benchmarks/call_overhead.py                     # 64 tokens, fp32, torch's thread count
    python benchmarks/call_overhead.py --tokens 1024 --threads 1

A plain script, not a ``test_*.py`` file: pytest does not collect it (benchmarks/conftest.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import timeit

import torch

from multiverse_kernels import append_paged_kv, tree_attention
from multiverse_kernels._native import host_op
from multiverse_kernels.backends import cpu as cpu_backend
from multiverse_kernels.bench.workloads import sampling_forest, workload_from_forest
from multiverse_kernels.info import cpu_model, kernel_isa
from multiverse_kernels.integrations.vllm_sharing import forest_from_block_table

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def calls(tokens: int, dtype: torch.dtype) -> dict[str, object]:
    """The timed callables on a lone sequence of ``tokens`` tokens (half prompt, half generated)."""
    f, groups = sampling_forest(tokens - tokens // 2, 1, tokens // 2, page_size=32)
    w = workload_from_forest("single", f, groups, "cpu", dtype)
    q, k, v, meta = w.q, w.k_cache, w.v_cache, w.meta
    qg = q.clone().requires_grad_()
    run_meta, plan = cpu_backend._run_plan(q, k, meta)
    ts, ints = plan.tensors(), plan.ints()
    scale = q.shape[-1] ** -0.5
    return {
        "op, validate=True": lambda: tree_attention(q, k, v, meta, backend="cpu"),
        "op, validate=False": lambda: tree_attention(q, k, v, meta, backend="cpu", validate=False),
        "op, autograd": lambda: tree_attention(qg, k, v, meta, backend="cpu", validate=False),
        "backend function": lambda: cpu_backend.tree_attention(q, k, v, meta, scale),
        "C++ op": lambda: torch.ops.multiverse_C.tree_attention_run(
            q, k, v, run_meta.node_page_indptr, run_meta.node_page_indices, ts, ints, scale, None),
        "step plan (once per step)": lambda: cpu_backend._run_plan(q, k, meta, cached=False),
        **step_forest_calls(tokens),
    }


def step_forest_calls(tokens: int, block_size: int = 32) -> dict[str, object]:
    """The vLLM backend's other per-step cost: the lone sequence's block table -> its forest
    (``forest_from_block_table``), in C++ (what CPU tables use) and in torch (GPU tables, the spec)."""
    nblk = -(-tokens // block_size)
    tab = torch.arange(nblk, dtype=torch.int32)[None]
    seq, qo = torch.tensor([tokens], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    out = {"block tables -> forest, torch (once per step)":
           lambda: forest_from_block_table(tab, seq, qo, block_size, stats=True, impl="torch")}
    if host_op("forest_from_block_table") is not None:
        out["block tables -> forest, C++ (once per step)"] = \
            lambda: forest_from_block_table(tab, seq, qo, block_size, stats=True, impl="cpp")
    return out


def append_calls(tokens: int, dtype: torch.dtype) -> dict[str, object]:
    """``append_paged_kv`` of one new token at the end of a lone sequence of ``tokens`` tokens."""
    f, groups = sampling_forest(tokens - tokens // 2, 1, tokens // 2, page_size=32)
    w = workload_from_forest("single", f, groups, "cpu", dtype)
    node = int(w.meta.vis_nodes[-1])
    last = int(w.meta.node_len[node]) - 1
    tn, tp = torch.tensor([node], dtype=torch.int32), torch.tensor([last], dtype=torch.int32)
    k = torch.randn(1, w.k_cache.shape[2], w.k_cache.shape[3]).to(dtype)
    kc, vc, pt = w.k_cache, w.v_cache, (w.meta.node_page_indptr, w.meta.node_page_indices)
    return {
        "append_paged_kv, validate=True": lambda: append_paged_kv(k, k, kc, vc, *pt, tn, tp, backend="cpu"),
        "append_paged_kv, validate=False": lambda: append_paged_kv(k, k, kc, vc, *pt, tn, tp, backend="cpu",
                                                                   validate=False),
        "append C++ op": lambda: torch.ops.multiverse_C.append_paged_kv(k, k, kc, vc, *pt, tn, tp),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="the sequence's tokens (>= 2)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of --number calls; the median is kept")
    ap.add_argument("--number", type=int, default=500, help="calls per round")
    args = ap.parse_args(argv)
    if args.tokens < 2 or args.rounds < 1 or args.number < 1 or args.threads < 0:
        ap.error("--tokens must be >= 2, --rounds and --number >= 1, --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    fns = {**calls(args.tokens, DTYPES[args.dtype]), **append_calls(args.tokens, DTYPES[args.dtype])}
    us = {}
    for name, fn in fns.items():
        fn()
        per_round = timeit.repeat(fn, number=args.number, repeat=args.rounds)
        us[name] = statistics.median(per_round) / args.number * 1e6
    isa, supported = kernel_isa()

    print(f"tree_attention per-call cost | {cpu_model()}, {os.cpu_count()} logical CPUs, "
          f"{torch.get_num_threads()} torch threads | ISA path {isa} (CPU supports {supported}) | "
          f"a lone sequence of {args.tokens} tokens, {args.dtype}, warm | torch {torch.__version__} | "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| call | us per call | over the C++ op |\n|---|---|---|")
    for name, t in us.items():
        if name.endswith("(once per step)"):  # not a layer of the call: its own cost
            print(f"| {name} | {t:.1f} | - |")
            continue
        floor = us["append C++ op" if name.startswith("append") else "C++ op"]
        print(f"| {name} | {t:.1f} | {t - floor:+.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
