"""Planning benchmark: what the planner builds for real step shapes, and how long it takes.

    python -m benchmarks.plan_build                 # table for 32 q / 8 KV heads, head_dim 128, fp16
    python -m benchmarks.plan_build --workers 264   # the device's parallelism (2 x SMs; H100: 132 SMs)

For each forest: work items, partial states stored in the workspace (rows with a single partial are
written straight to the output and take none), workspace bytes (fp32 out + lse per slot and query head)
next to the output's bytes, the K+V bytes the kernels load according to the plan (each item loads its
chunk up to the largest limit of its readers, for every KV head) over the forest's unique K+V bytes
(also for head_dim 64, whose 256-row tile holds 64 readers at GQA 4; head_dim 128 tiles hold 128 rows),
the partial-state traffic (written once, read once by the merge) over the unique K+V bytes, and the
plan time (median and min of N, one CPU thread) of the C++ host planner (the default) and of the torch
planner. The loads column is derived from the plan; scripts/triton_kv_traffic.py measures the Triton
kernels' loads in the interpreter.

Every figure is the forward's default path: tiny nodes absorbed first (absorption.absorb_tiny_nodes,
docs/plan.md "Tiny nodes"), then planned; the plan time includes the absorption (C++ / torch). The
"absorbed" column gives the virtual nodes made, and the partials and K+V + partial bytes (over the
unique K+V) the plan would have without absorbing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multiverse_kernels import ForestMetadata, KVForest
from multiverse_kernels.absorption import absorb_tiny_nodes
from multiverse_kernels.planning import _cpp_planner, plan_kv_tokens, plan_loaded_tokens, plan_tree_attention
from multiverse_kernels.testing import beam_forest, eagle_tree_forest, multiverse_forest, sampling_forest

HQ, HK, D, ELEM = 32, 8, 128, 2  # fp16


def thousand_leaf_forest(page_size: int = 16) -> ForestMetadata:
    """1,024 leaves: a 512-token prompt, 32 subtrees of 64 tokens, 32 leaves of 16 tokens under each
    (each leaf decoding one token), page size 16."""
    f = KVForest(8192, page_size)
    root = f.new_sequence(512)
    leaves = []
    for mid in f.fork(root, 32):
        f.append(mid, 64)
        for leaf in f.fork(mid, 32):
            f.append(leaf, 16)
            leaves.append(leaf)
    return f.decode_metadata(leaves)


def token_tree_forest(depth: int = 10) -> ForestMetadata:
    """Tiny nodes: a 256-token prompt under a binary tree of one-token nodes, 2**depth leaves decoding
    (2**(depth+1) - 2 one-token nodes, page size 1)."""
    f = KVForest(8192, 1)
    level = [f.new_sequence(256)]
    for _ in range(depth):
        nxt = []
        for p in level:
            for k in f.fork(p, 2):
                f.append(k, 1)
                nxt.append(k)
        level = nxt
    return f.decode_metadata(level)


def eagle_forest(prefix: int = 1024, widths: tuple[int, ...] = (4, 3, 2, 2, 1)) -> ForestMetadata:
    """An EAGLE-style token tree over a ``prefix``-token context (page size 1; bench.workloads builds it):
    4 + 12 + 24 + 48 + 48 = 136 draft tokens by default."""
    f, groups = eagle_tree_forest(prefix, 1, widths)
    return f.metadata(groups)


def causal_prefill(tokens: int, page_size: int = 16) -> ForestMetadata:
    """One sequence prefilling ``tokens`` tokens (causal, one node)."""
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    pages = -(-tokens // page_size)
    return ForestMetadata(i32([0, pages]), torch.arange(pages, dtype=torch.int32), i32([tokens]),
                          i32([0, tokens]), i32([0, 1]), i32([0]), page_size)


def packed_prefill(tokens: int, node_tokens: int, page_size: int = 16) -> ForestMetadata:
    """One sequence prefilling ``tokens`` tokens packed as a chain of ``node_tokens``-token nodes: group
    ``i`` (its node's rows) sees nodes ``0 .. i`` (causal in its own node), positions consecutive."""
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    n = -(-tokens // node_tokens)
    lens = [min(node_tokens, tokens - i * node_tokens) for i in range(n)]
    pages = [-(-ln // page_size) for ln in lens]
    page_ip = [0]
    for p in pages:
        page_ip.append(page_ip[-1] + p)
    qo = [0]
    for ln in lens:
        qo.append(qo[-1] + ln)
    vis, vi = [], [0]
    for i in range(n):
        vis += list(range(i + 1))
        vi.append(len(vis))
    meta = ForestMetadata(i32(page_ip), torch.arange(page_ip[-1], dtype=torch.int32), i32(lens), i32(qo),
                          i32(vi), i32(vis), page_size)
    return meta.with_node_pos(i32([i * node_tokens for i in range(n)]))


def window_rows(workers: int, reps: int, have_cpp: bool) -> None:
    """Sliding-window plans (docs/plan.md, "Sliding window"): K/V tokens the plan loads (per KV head,
    summed over items) against the keys its rows read inside the window, and the unique tokens."""
    print()
    print("Sliding window (4K) over a 32K-token prefill: plan-derived K/V tokens loaded per KV head (each "
          "item: its readers' smallest reader_lo .. largest reader_limit), over the unique tokens; the same "
          "without the window; the (row, key) pairs inside the window over the causal ones")
    print()
    print("| forest | window | items | partials | loaded tokens | loaded / unique | (without window) "
          "| loaded per item / L | visible keys / causal keys | C++ plan us |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, meta in (("32K causal prefill, one node", causal_prefill(32768)),
                       ("32K packed prefill, 16 nodes of 2K", packed_prefill(32768, 2048))):
        unique = plan_kv_tokens(meta)
        full = plan_tree_attention(meta, HQ, HK, head_dim=D, num_workers=workers)
        for window in (4096,):
            plan = plan_tree_attention(meta, HQ, HK, head_dim=D, num_workers=workers, window=window)
            loaded = plan_loaded_tokens(plan)
            R = plan.num_readers
            seen = int((plan.reader_limit[:R] - plan.reader_lo[:R]).long().sum())
            causal = int(full.reader_limit[:full.num_readers].long().sum())
            cpp = "-"
            if have_cpp:
                med, mn = _time(lambda m=meta, w=window: plan_tree_attention(
                    m, HQ, HK, head_dim=D, num_workers=workers, window=w, impl="cpp"), reps)
                cpp = f"{med * 1e6:,.0f} ({mn * 1e6:,.0f})"
            print(f"| {name} | {window:,} | {plan.num_items:,} | {plan.num_partials:,} | {loaded:,} | "
                  f"{loaded / unique:.3f} | {plan_loaded_tokens(full) / unique:.3f} | "
                  f"{loaded / plan.num_items / unique:.3f} (W/L = {window / unique:.3f}) | "
                  f"{seen / causal:.3f} | {cpp} |")


def forests() -> dict[str, ForestMetadata]:
    def meta(fg):
        f, groups = fg
        return f.metadata(groups)

    return {
        "Multiverse (1024 prefix, 8 paths x 128, join)": meta(multiverse_forest(1024, 8, 128, 2)),
        "16-way sampling (1024 prompt, x 24)": meta(sampling_forest(1024, 16, 24)),
        "64-way sampling (1024 prompt, x 24)": meta(sampling_forest(1024, 64, 24)),
        "256-way sampling (256 prompt, x 4)": meta(sampling_forest(256, 256, 4)),
        "beam depth 4 x width 16 (512 prompt)": meta(beam_forest(512, 4, 16, 8)),
        "beam depth 4 x width 64 (512 prompt)": meta(beam_forest(512, 4, 64, 8)),
        "EAGLE token tree (1024 prefix, 136 drafts)": eagle_forest(),
        "1,024 leaves (512 / 32 x 64 / 1024 x 16)": thousand_leaf_forest(),
        "binary token tree (256 prompt, 2046 one-token nodes)": token_tree_forest(),
        "4K causal prefill": causal_prefill(4096),
        "32K causal prefill": causal_prefill(32768),
    }


def _time(fn, reps: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=264, help="num_workers (default 264: 2 x 132 SMs)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-torch", action="store_true", help="skip timing the torch planner")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    have_cpp = _cpp_planner() is not None
    kv_tok = 2 * HK * D * ELEM  # K+V bytes of one token, all KV heads
    print(f"{HQ} q / {HK} KV heads, head_dim {D}, fp16; num_workers={args.workers}; plan time: median "
          f"(min) of {args.reps}, 1 CPU thread, torch {torch.__version__}"
          + ("" if have_cpp else "; C++ planner NOT BUILT"))
    print()
    print("| forest | rows | nodes | absorbed: virtual nodes (partials, bytes / unique without) | items | "
          "partials | workspace MB | output MB | ws / out | loaded / unique K+V (d 128) | (d 64) | "
          "partial traffic / unique K+V | C++ plan us | torch plan us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def step(meta: ForestMetadata, impl: str | None, d: int = D):
        run = absorb_tiny_nodes(meta, HQ, HK, head_dim=d, kv_elem_size=ELEM, impl=impl)
        return run, plan_tree_attention(run, HQ, HK, head_dim=d, num_workers=args.workers, impl=impl)

    for name, meta in forests().items():
        run, plan = step(meta, None)
        unique = plan_kv_tokens(meta) * kv_tok
        loaded = plan_loaded_tokens(plan) * kv_tok
        loaded64 = plan_loaded_tokens(step(meta, None, 64)[1]) / plan_kv_tokens(meta)
        ws = plan.workspace_bytes(HQ, D)
        out = meta.total_q * HQ * D * ELEM
        bare = plan_tree_attention(meta, HQ, HK, head_dim=D, num_workers=args.workers)
        bare_bytes = plan_loaded_tokens(bare) * kv_tok + 2 * bare.workspace_bytes(HQ, D)
        absorbed = (f"{run.num_nodes - meta.num_nodes:,} ({bare.num_partials:,}, "
                    f"{(loaded + 2 * ws) / unique:.2f} / {bare_bytes / unique:.2f})"
                    if run is not meta else "-")
        cpp = "-"
        if have_cpp:
            med, mn = _time(lambda m=meta: step(m, "cpp"), args.reps)
            cpp = f"{med * 1e6:,.0f} ({mn * 1e6:,.0f})"
        tor = "-"
        if not args.no_torch:
            med, mn = _time(lambda m=meta: step(m, "torch"), max(5, args.reps // 5))
            tor = f"{med * 1e6:,.0f} ({mn * 1e6:,.0f})"
        print(f"| {name} | {meta.total_q:,} | {meta.num_nodes:,} | {absorbed} | {plan.num_items:,} | "
              f"{plan.num_partials:,} | {ws / 2**20:,.2f} | {out / 2**20:,.2f} | {ws / out:.2f} | "
              f"{loaded / unique:.3f} | {loaded64:.3f} | {2 * ws / unique:.3f} | {cpp} | {tor} |")
    window_rows(args.workers, max(5, args.reps // 5), have_cpp)


if __name__ == "__main__":
    main()
