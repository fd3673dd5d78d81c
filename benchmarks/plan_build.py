"""Planner build time for a 1,024-leaf forest (docs/plan.md reports the numbers).

    python -m benchmarks.plan_build            # host (CPU) planning, median of 50 runs

Forest: a 512-token prompt, 32 subtrees of 64 tokens, 32 leaves of 16 tokens under each (1,024 leaves,
each decoding one token), page size 16; 32 query heads over 8 KV heads.
"""

from __future__ import annotations

import statistics
import time

import torch

from multiverse_kernels import ForestMetadata, KVForest
from multiverse_kernels.planning import plan_tree_attention


def thousand_leaf_forest(page_size: int = 16) -> ForestMetadata:
    """Metadata of the 1,024-leaf decode step described in the module docstring."""
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


def _time(label: str, meta: ForestMetadata, chunk: int) -> None:
    plan_tree_attention(meta, 32, 8, chunk_tokens=chunk)  # warm-up
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        plan = plan_tree_attention(meta, 32, 8, chunk_tokens=chunk)
        times.append(time.perf_counter() - t0)
    print(f"{label}, chunk_tokens={chunk}: nodes={meta.num_nodes} items={plan.num_items} "
          f"partials={plan.num_partials} readers={plan.num_readers}  median "
          f"{statistics.median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms "
          f"(torch {torch.__version__}, 1 thread)")


def main() -> None:
    torch.set_num_threads(1)
    meta = thousand_leaf_forest()
    for chunk in (512, 64):
        _time("1,024 leaves", meta, chunk)
    _time("1,024-leaf binary token tree (one-token nodes)", token_tree_forest(), 512)


if __name__ == "__main__":
    main()
