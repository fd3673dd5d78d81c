"""The benchmark forests: one definition, used by the main job, the sweeps, the tests' shape
generators (:mod:`multiverse_kernels.testing` re-exports the builders), ``benchmarks/`` and ``scripts/``.

Every builder returns ``(forest, groups)``: a :class:`~multiverse_kernels.KVForest` and the query groups
``[(node, q_len), ...]`` of one step (``forest.metadata(groups)`` gives the metadata). Pages are allocated
densely from page 0 in build order, so ``forest.num_pages - forest.num_free_pages`` pages hold every
token. :data:`BENCH_FORESTS` names the main job's three steps as instances of the builders;
:func:`make_workload` fills the caches and queries for one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..dense_mask import dense_mask
from ..forest import KVForest
from ..metadata import ForestMetadata

__all__ = ["multiverse_forest", "sampling_forest", "extend_forest", "beam_forest", "eagle_tree_forest",
           "BENCH_FORESTS", "build_forest", "Workload", "make_workload", "workload_from_forest",
           "sweep_workload", "single_sequence_workload", "SINGLE", "SINGLE_DESC", "BENCH_HEADS",
           "VARIANT_FORESTS", "key_and_row_positions", "head_major"]

Groups = list[tuple[int, int]]


def _pages(n: int, page_size: int) -> int:
    return -(-n // page_size)


def key_and_row_positions(meta: ForestMetadata) -> tuple[Tensor, Tensor]:
    """(position of every key in ``dense_mask.key_slots`` order, position of every query row), from the
    forest's positions (``meta.positions()``: what a sliding window measures in)."""
    pos = meta.positions().long()
    lens = meta.node_len.long()
    node = torch.repeat_interleave(torch.arange(meta.num_nodes, device=pos.device), lens)
    j = torch.arange(node.numel(), device=pos.device) - (torch.cumsum(lens, 0) - lens)[node]
    q_lens = meta.q_lens().long()
    group = torch.repeat_interleave(torch.arange(meta.num_groups, device=pos.device), q_lens)
    own = meta.own_nodes()[group]
    i = torch.arange(meta.total_q, device=pos.device) - meta.qo_indptr.long()[group]
    return pos[node] + j, pos[own] + lens[own] - q_lens[group] + i


# ---------------------------------------------------------------------------------------- shapes
def multiverse_forest(prefix: int = 64, paths: int = 4, path_len: int = 16, concl_len: int = 2,
                      page_size: int = 16, concl_q: int = 1) -> tuple[KVForest, Groups]:
    """Multiverse step: a ``prefix``-token trunk, ``paths`` paths of ``path_len`` tokens decoding one
    token each, and a conclusion of ``concl_len`` tokens joining them (its last ``concl_q`` tokens are
    query rows; 0: no conclusion group)."""
    f = KVForest(_pages(prefix, page_size) + paths * _pages(path_len, page_size)
                 + _pages(concl_len, page_size) + 1, page_size)
    root = f.new_sequence(prefix)
    kids = f.fork(root, paths)
    for k in kids:
        f.append(k, path_len)
    c = f.join(kids)
    f.append(c, concl_len)
    return f, [(k, 1) for k in kids] + ([(c, concl_q)] if concl_q else [])


def sampling_forest(prompt: int = 64, samples: int = 16, gen_len: int = 8, page_size: int = 16,
                    q_len: int = 1) -> tuple[KVForest, Groups]:
    """Parallel sampling: one ``prompt``, ``samples`` children of ``gen_len`` tokens, each with its last
    ``q_len`` tokens as query rows (1: a decode step)."""
    f = KVForest(_pages(prompt, page_size) + samples * _pages(gen_len, page_size) + 1, page_size)
    root = f.new_sequence(prompt)
    kids = f.fork(root, samples)
    for k in kids:
        f.append(k, gen_len)
    return f, [(k, q_len) for k in kids]


def extend_forest(prompt: int = 64, branches: int = 8, draft: int = 16, page_size: int = 16
                  ) -> tuple[KVForest, Groups]:
    """Speculative verification: a ``prompt`` and ``branches`` branches of ``draft`` draft tokens, each
    branch verifying its tokens at once (q_len ``draft``, causal within the branch)."""
    return sampling_forest(prompt, branches, draft, page_size, q_len=draft)


def beam_forest(prompt: int = 32, depth: int = 4, width: int = 16, step_len: int = 4,
                page_size: int = 16) -> tuple[KVForest, Groups]:
    """Beam-like tree: a prompt, then ``depth`` levels of ``step_len`` tokens; level d has
    min(2**(d+1), width) nodes, the last level ``width`` leaves, each decoding one token."""
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


def eagle_tree_forest(prefix: int = 48, page_size: int = 1, widths: tuple[int, ...] = (3, 2, 1)
                      ) -> tuple[KVForest, Groups]:
    """EAGLE/Medusa-style speculative token tree over a prefix: one draft token per node, level ``d``
    expanding every frontier token into ``widths[d]`` children (default top-3, then top-2, then top-1);
    every draft token is a query row that sees its ancestors."""
    f = KVForest(_pages(prefix, page_size) + 4096, page_size)
    root = f.new_sequence(prefix)
    groups = []
    frontier = [root]
    for width in widths:
        nxt = []
        for p in frontier:
            for k in f.fork(p, width):
                f.append(k, 1)
                groups.append((k, 1))
                nxt.append(k)
        frontier = nxt
    return f, groups


# ------------------------------------------------------------------------------ the main job's steps
BENCH_FORESTS: dict[str, tuple[str, Callable[[int], tuple[KVForest, Groups]]]] = {
    "multiverse": ("Multiverse: prefix 4096, 8 paths x 512, conclusion (32) joining them; 9 rows",
                   lambda ps: multiverse_forest(4096, 8, 512, 32, page_size=ps, concl_q=1)),
    "sampling16": ("16-way sampling: prompt 4096, 16 x 256; 16 rows",
                   lambda ps: sampling_forest(4096, 16, 256, page_size=ps)),
    "extend": ("extend: prompt 4096, 8 branches x 16 draft tokens; 128 rows",
               lambda ps: extend_forest(4096, 8, 16, page_size=ps)),
    "window": ("Multiverse with a 1024-token sliding window (Mistral / Gemma sliding layers); 9 rows",
               lambda ps: multiverse_forest(4096, 8, 512, 32, page_size=ps, concl_q=1)),
    "fp8": ("16-way sampling over an fp8 (e4m3) KV cache, per-KV-head scales, bf16 queries; 16 rows",
            lambda ps: sampling_forest(4096, 16, 256, page_size=ps)),
}
"""The main job's forests (one decode step each): name -> (description, builder(page_size))."""

VARIANT_FORESTS = {"window": dict(window=1024), "fp8": dict(fp8=torch.float8_e4m3fn)}
"""The attention variant of the forests that have one (multiverse_kernels/variants.py)."""

BENCH_HEADS = (32, 8, 128)
"""(query heads, KV heads, head_dim) of the main job."""


def build_forest(name: str, page_size: int = 16) -> tuple[KVForest, Groups]:
    """One of :data:`BENCH_FORESTS` by name."""
    if name not in BENCH_FORESTS:
        raise ValueError(f"forest: expected one of {sorted(BENCH_FORESTS)}, got {name!r}")
    return BENCH_FORESTS[name][1](page_size)


@dataclass
class Workload:
    """A forest step with its caches and queries: q [total_q, Hq, D], caches [pages, page_size, Hk, D]."""

    name: str
    forest: KVForest
    meta: ForestMetadata
    q: Tensor
    k_cache: Tensor
    v_cache: Tensor
    variant: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``tree_attention`` for the step's attention variant (window, fp8 scales)."""

    @property
    def unique_kv_bytes(self) -> int:
        """K+V bytes of every token some row sees, each once (the step's lower bound; with a sliding
        window only the tokens inside some row's window)."""
        per_tok = 2 * self.k_cache.shape[2] * self.k_cache.shape[3] * self.k_cache.element_size()
        window = self.variant.get("window")
        if window is not None:  # tokens inside some row's window (rows x tokens: small for a decode step)
            kpos, rpos = key_and_row_positions(self.meta)
            seen_tok = (dense_mask(self.meta) & ((rpos[:, None] - kpos[None, :]) < window)).any(0)
            return int(seen_tok.sum()) * per_tok
        lens = self.meta.node_len.long()
        seen = torch.zeros(self.meta.num_nodes, dtype=torch.bool)
        q_lens = self.meta.q_lens().long()
        gid = torch.repeat_interleave(torch.arange(self.meta.num_groups),
                                      (self.meta.vis_indptr[1:] - self.meta.vis_indptr[:-1]).long())
        seen[self.meta.vis_nodes.long()[q_lens[gid] > 0]] = True
        return int(lens[seen].sum()) * per_tok


def workload_from_forest(name: str, forest: KVForest, groups: Groups, device: str | torch.device,
                         dtype: torch.dtype, hq: int = BENCH_HEADS[0], hk: int = BENCH_HEADS[1],
                         d: int = BENCH_HEADS[2], seed: int = 0,
                         meta: ForestMetadata | None = None) -> Workload:
    """Random caches (the used pages) and queries for ``forest``'s step ``groups`` (or ``meta``)."""
    meta = (meta if meta is not None else forest.metadata(groups)).to(device)
    g = torch.Generator().manual_seed(seed)
    used = forest.num_pages - forest.num_free_pages
    shape = (used, forest.page_size, hk, d)  # the pool is allocated densely from page 0
    k = torch.randn(shape, generator=g).to(device, dtype)
    v = torch.randn(shape, generator=g).to(device, dtype)
    q = torch.randn(meta.total_q, hq, d, generator=g).to(device, dtype)
    return Workload(name, forest, meta, q, k, v)


def head_major(cache: Tensor) -> Tensor:
    """The values of a ``[pages, page_size, Hk, D]`` cache stored head-major (``[pages, Hk, page_size, D]``
    contiguous: one head's rows of a page adjacent), returned as the same ``[pages, page_size, Hk, D]``
    view (strides permuted), which every backend accepts."""
    return cache.transpose(1, 2).contiguous().transpose(1, 2)


def make_workload(name: str, device: str | torch.device, dtype: torch.dtype, hq: int = BENCH_HEADS[0],
                  hk: int = BENCH_HEADS[1], d: int = BENCH_HEADS[2], page_size: int = 16,
                  seed: int = 0) -> Workload:
    """The main job's step ``name`` (:data:`BENCH_FORESTS`) with random caches and queries; a variant
    forest (:data:`VARIANT_FORESTS`) with its variant (fp8: the caches quantized per KV head, q bf16)."""
    f, groups = build_forest(name, page_size)
    spec = VARIANT_FORESTS.get(name, {})
    if "fp8" in spec:
        dtype = torch.bfloat16
    w = workload_from_forest(name, f, groups, device, dtype, hq, hk, d, seed)
    if "window" in spec:
        w.variant = {"window": spec["window"]}
    if "fp8" in spec:
        amax = lambda x: x.float().abs().amax(dim=(0, 1, 3)).clamp(min=1e-6)  # noqa: E731  per KV head
        fmax = torch.finfo(spec["fp8"]).max
        ks, vs = amax(w.k_cache) / fmax, amax(w.v_cache) / fmax
        w.k_cache = (w.k_cache.float() / ks[:, None]).to(spec["fp8"])
        w.v_cache = (w.v_cache.float() / vs[:, None]).to(spec["fp8"])
        w.variant = {"k_scale": ks.float(), "v_scale": vs.float()}
    return w


SINGLE = "single"
"""The name of the single unshared sequence (:func:`single_sequence_workload`), next to
:data:`BENCH_FORESTS` in the peer benchmarks (benchmarks/vllm_cpu_peer.py, benchmarks/load_overlap.py)."""
SINGLE_DESC = "single unshared sequence: prompt 4096 + 256 (the sampling forest with 1 sample); 1 row"


def single_sequence_workload(device: str | torch.device, dtype: torch.dtype, page_size: int = 16,
                             prompt: int = 4096, seed: int = 0) -> Workload:
    """One unshared sequence of ``prompt`` + 256 tokens decoding one token (:func:`sampling_forest` with
    one sample; the main job's head counts): the step without sharing, where a per-branch kernel reads
    what ours reads."""
    f, groups = sampling_forest(prompt, 1, 256, page_size=page_size)
    return workload_from_forest(SINGLE, f, groups, device, dtype, seed=seed)


def sweep_workload(prompt: int, readers: int, branch_len: int, device: str | torch.device,
                   dtype: torch.dtype, hq: int = BENCH_HEADS[0], hk: int = BENCH_HEADS[1],
                   d: int = BENCH_HEADS[2], page_size: int = 16, seed: int = 0) -> Workload:
    """The sweeps' step: a ``prompt``-token root and ``readers`` children of ``branch_len`` tokens, each
    decoding one token (:func:`sampling_forest`)."""
    f, groups = sampling_forest(prompt, readers, branch_len, page_size)
    return workload_from_forest(f"prompt {prompt}, {readers} x {branch_len}", f, groups, device, dtype,
                                hq, hk, d, seed)
