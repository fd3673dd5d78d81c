"""Forest generators for tests and benchmarks: random forests and the shapes of real use.

Every generator returns ``(forest, groups)``: a :class:`KVForest` and the query groups
``[(node, q_len), ...]`` of one step; ``forest.metadata(groups)`` gives the metadata. The K/V cache is
filled by :func:`make_inputs`.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from .forest import KVForest
from .metadata import ForestMetadata

__all__ = [
    "design_example_forest",
    "random_forest",
    "multiverse_forest",
    "sampling_forest",
    "beam_forest",
    "eagle_tree_forest",
    "make_inputs",
    "tolerance",
]


def _pool(num_pages: int, page_size: int, rng: random.Random | None) -> KVForest:
    order = list(range(num_pages))
    if rng is not None:
        rng.shuffle(order)
    return KVForest(num_pages, page_size, page_order=order)


def design_example_forest() -> tuple[KVForest, list[tuple[int, int]]]:
    """docs/design.md §2's worked example (page size 4, 16 pages): a 10-token trunk, paths A (5 tokens) and
    B (3), a conclusion C (2) joining them; A and B decode one row each, C extends by 2."""
    f = KVForest(16, 4)
    trunk = f.new_sequence(10)
    a, b = f.fork(trunk, 2)
    f.append(a, 5)
    f.append(b, 3)
    c = f.join([a, b])
    f.append(c, 2)
    return f, [(a, 1), (b, 1), (c, 2)]


def random_forest(seed: int, page_size: int = 4, max_len: int = 24, max_nodes: int = 12,
                  max_q_len: int = 4, join_prob: float = 0.25) -> tuple[KVForest, list[tuple[int, int]]]:
    """A random forest: 1-2 roots, forks of random width, joins of random leaf sets, node lengths
    from 0 (empty) and 1 up to ``max_len``, random page order, and groups mixing decode (q_len 1),
    extend (q_len up to ``max_q_len``) and empty groups (q_len 0)."""
    rng = random.Random(seed)
    f = _pool(4096, page_size, rng)
    def rand_len() -> int:
        return rng.choice([0, 1, rng.randint(1, max_len), rng.randint(1, max_len)])
    leaves = [f.new_sequence(rand_len()) for _ in range(rng.randint(1, 2))]
    while f.num_nodes < max_nodes:
        r = rng.random()
        if r < join_prob and len(leaves) >= 2:
            pick = rng.sample(leaves, rng.randint(2, min(4, len(leaves))))
            n = f.join(pick)
            leaves = [x for x in leaves if x not in pick] + [n]
            f.append(n, rand_len())
        else:
            p = rng.choice(leaves)
            kids = f.fork(p, rng.randint(1, 3))
            leaves.remove(p)
            for k in kids:
                f.append(k, rand_len())
            leaves += kids
    for n in leaves:  # make sure most leaves have something to query
        if f.node_len(n) == 0 and rng.random() < 0.7:
            f.append(n, rng.randint(1, max_q_len))
    groups = []
    for n in leaves:
        ln = f.node_len(n)
        q_len = 0 if ln == 0 else rng.choice([1, 1, rng.randint(0, min(ln, max_q_len))])
        groups.append((n, q_len))
    rng.shuffle(groups)
    return f, groups


def multiverse_forest(prefix: int = 64, paths: int = 4, path_len: int = 16, concl_len: int = 2,
                      page_size: int = 16, concl_q: int = 1) -> tuple[KVForest, list[tuple[int, int]]]:
    """Multiverse step: a prefix, ``paths`` paths decoding one token each, and a conclusion that joins
    them (its last ``concl_q`` tokens extend)."""
    per = lambda n: -(-n // page_size)
    f = KVForest(per(prefix) + paths * per(path_len) + per(concl_len) + 1, page_size)
    root = f.new_sequence(prefix)
    kids = f.fork(root, paths)
    for k in kids:
        f.append(k, path_len)
    c = f.join(kids)
    f.append(c, concl_len)
    return f, [(k, 1) for k in kids] + ([(c, concl_q)] if concl_q else [])


def sampling_forest(prompt: int = 64, samples: int = 16, gen_len: int = 8, page_size: int = 16
                    ) -> tuple[KVForest, list[tuple[int, int]]]:
    """Parallel sampling: one prompt, ``samples`` children decoding one token each."""
    per = lambda n: -(-n // page_size)
    f = KVForest(per(prompt) + samples * per(gen_len) + 1, page_size)
    root = f.new_sequence(prompt)
    kids = f.fork(root, samples)
    for k in kids:
        f.append(k, gen_len)
    return f, [(k, 1) for k in kids]


def beam_forest(prompt: int = 32, depth: int = 4, width: int = 16, step_len: int = 4,
                page_size: int = 16) -> tuple[KVForest, list[tuple[int, int]]]:
    """Beam-like tree: a prompt, then ``depth`` levels; level d has min(2**d, width)... nodes, the last
    level ``width`` leaves, each level ``step_len`` tokens."""
    f = KVForest(4096, page_size)
    root = f.new_sequence(prompt)
    level = [root]
    for d in range(depth):
        target = width if d == depth - 1 else min(width, 2 ** (d + 1))
        per_parent = -(-target // len(level))
        nxt = []
        for p in level:
            for k in f.fork(p, per_parent):
                f.append(k, step_len)
                nxt.append(k)
        level = nxt[:target] if len(nxt) > target else nxt
    return f, [(n, 1) for n in level]


def eagle_tree_forest(prefix: int = 48, page_size: int = 1) -> tuple[KVForest, list[tuple[int, int]]]:
    """EAGLE/Medusa-style speculative token tree over a prefix: one draft token per node (top-3, then
    top-2, then top-1 expansions); every draft token is a query row that sees its ancestors."""
    f = KVForest(4096, page_size)
    root = f.new_sequence(prefix)
    groups = []
    frontier = [root]
    for width in (3, 2, 1):
        nxt = []
        for p in frontier:
            for k in f.fork(p, width):
                f.append(k, 1)
                groups.append((k, 1))
                nxt.append(k)
        frontier = nxt
    return f, groups


def make_inputs(meta: ForestMetadata, num_pages: int, num_qo_heads: int = 4, num_kv_heads: int = 2,
                head_dim: int = 64, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random ``q [total_q, Hq, D]`` and caches ``[num_pages, page_size, Hk, D]`` for ``meta``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(meta.total_q, num_qo_heads, head_dim, generator=g)
    shape = (num_pages, meta.page_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``atol``/``rtol`` for comparing a backend's output in ``dtype`` with the reference."""
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    }[dtype]


def import_cpu_backend_or_skip():
    """The ``cpu`` backend module for a test module, or a module-level pytest skip naming why it is
    missing. With ``MULTIVERSE_REQUIRE_CPP=1`` (CI) a missing extension is an error, never a skip."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module("multiverse_kernels.backends.cpu")
    except (ImportError, OSError, RuntimeError) as e:  # extension not built
        if os.environ.get("MULTIVERSE_REQUIRE_CPP") == "1":
            raise
        pytest.skip(f"C++ CPU extension not built ({e}); see docs/build.md", allow_module_level=True)
