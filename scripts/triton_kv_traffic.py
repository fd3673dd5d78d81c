"""Measured K/V bytes loaded by the Triton tree-attention kernels vs the forest's unique KV bytes.

    python scripts/triton_kv_traffic.py          # prints the markdown table in docs/performance.md
    python scripts/triton_kv_traffic.py --large  # also the issue's sizes (1K-token prompts; minutes)

The bytes are counted at the loads while the kernels run in the Triton interpreter (CPU tensors; the
backend's ``tree_attention_kv_bytes`` hook), not derived from the metadata. "per-branch" is what a
per-branch paged-decode kernel (vLLM / SGLang style) must read: every group reads every token it sees.
"partials" is the fp32 partial-state traffic of the same plan (each workspace slot written once by the
attention kernel and read once by the merge; rows with a single partial skip the workspace).
"""

from __future__ import annotations

import argparse

import torch

from multiverse_kernels.backends import resolve
from multiverse_kernels.plan_cache import cached_run_plan
from multiverse_kernels.planning import plan_kv_tokens
from multiverse_kernels.testing import (
    beam_forest,
    eagle_tree_forest,
    make_inputs,
    multiverse_forest,
    sampling_forest,
)

HQ, HK, D, DTYPE = 8, 2, 64, torch.float16

FORESTS = {
    "Multiverse (64-token prefix, 8 paths x 16, join)": lambda: multiverse_forest(64, 8, 16, 2),
    "16-way sampling (64-token prompt)": lambda: sampling_forest(64, 16, 8),
    "beam depth 4 x width 16": lambda: beam_forest(32, 4, 16, 4),
    "EAGLE token tree (48 prefix, page 1)": lambda: eagle_tree_forest(48, 1),
    "64-way sampling (256 packed rows: one tile)": lambda: sampling_forest(64, 64, 8),
    "beam depth 4 x width 64 (256 packed rows: one tile)": lambda: beam_forest(32, 4, 64, 4),
    "128-way sampling (512 packed rows: two tiles)": lambda: sampling_forest(64, 128, 8),
}
# The sizes of issue 12's figures (slow in the interpreter: minutes each).
LARGE = {
    "Multiverse (1024 prefix, 8 paths x 128, join)": lambda: multiverse_forest(1024, 8, 128, 2),
    "32 beams over 512 tokens (x 8)": lambda: beam_forest(512, 4, 32, 8),
    "64 samples over a 1024-token prompt (x 24)": lambda: sampling_forest(1024, 64, 24),
    "128 samples over 256 tokens (x 4)": lambda: sampling_forest(256, 128, 4),
}


def per_branch_tokens(meta) -> int:
    """Tokens a per-branch kernel reads: sum over groups with rows of the tokens of their listed nodes."""
    q_len = (meta.qo_indptr[1:] - meta.qo_indptr[:-1]).long()
    cnt = (meta.vis_indptr[1:] - meta.vis_indptr[:-1]).long()
    has_rows = torch.repeat_interleave(q_len > 0, cnt)
    return int(meta.node_len.long()[meta.vis_nodes.long()][has_rows].sum())


def measure(make):
    f, groups = make()
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, HQ, HK, D, DTYPE)
    measured = resolve("tree_attention_kv_bytes", "triton", q.device)(q, k, v, meta, D ** -0.5)
    per_token = 2 * HK * D * k.element_size()  # K and V, all KV heads
    # the plan the backend ran (its default path: tiny nodes absorbed, docs/plan.md "Tiny nodes")
    _, plan = cached_run_plan(meta, HQ, HK, head_dim=D, kv_elem_size=k.element_size())
    partials = 2 * plan.workspace_bytes(HQ, D)
    return measured, plan_kv_tokens(meta) * per_token, per_branch_tokens(meta) * per_token, partials


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also the issue's larger forests (slow)")
    args = ap.parse_args(argv)
    print(f"Hq={HQ}, Hk={HK}, head_dim={D}, {str(DTYPE).replace('torch.', '')}; bytes of K+V\n")
    print("| forest | measured (Triton) | unique KV | measured / unique | per-branch | per-branch / unique "
          "| partials (write + read) | partials / unique |")
    print("|---|---|---|---|---|---|---|---|")
    forests = {**FORESTS, **(LARGE if args.large else {})}
    for name, make in forests.items():
        m, u, b, p = measure(make)
        print(f"| {name} | {m:,} | {u:,} | {m / u:.3f} | {b:,} | {b / u:.2f} | {p:,} | {p / u:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
