"""The vLLM backend's fixed buffers (multiverse_kernels.integrations.vllm_sharing.FixedStepBuffers): what a
captured CUDA graph reads. No vLLM needed.

A graph replays its kernels with the pointers and grid of the capture. The tests "capture" a step (keep
the Python objects its forward was called with), refill the same buffers with other steps (other
requests, other sharing, fewer real rows, the unshared fallback) and call the kernels again with the
*captured* objects: the outputs must be the new steps' attention (float64 reference on their own
unpadded forests), the padding rows must see nothing. On CPU this runs the C++ kernel and the Triton
kernel in the interpreter; with a CUDA GPU, a real torch.cuda.graph capture and replays.
"""

from __future__ import annotations

import os

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.integrations.vllm_sharing import (
    GRAPH_DEPTH,
    FixedStepBuffers,
    fixed_plan_capacity,
    forest_from_block_table,
)
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.planning import plan_tree_attention

HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CPU_BACKENDS = ["cpu"] + (["triton"] if HAS_TRITON and INTERPRETED else [])


def _batch(seed: int, bs: int, *, max_reqs: int, q_len: int = 1, deep: bool = False, long: bool = False):
    """A decode step as vLLM's builder sees it: a few prompts (their full blocks shared), each with
    several requests (own blocks), ``q_len`` query rows each; ``deep``: requests also share a middle
    run, so rows see up to 3 nodes. Returns (block_table, seq_lens, query_start_loc, num_pages)."""
    g = torch.Generator().manual_seed(seed)
    nxt = [1]  # block 0 is vLLM's padding block

    def new(n):
        r = list(range(nxt[0], nxt[0] + n))
        nxt[0] += n
        return r

    rows, seqs = [], []
    while len(rows) < max_reqs:
        prompt = new(int(torch.randint(0, 40 if long else 5, (1,), generator=g)))
        mid = new(int(torch.randint(1, 3, (1,), generator=g))) if deep else []
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            if len(rows) == max_reqs:
                break
            base = prompt + (mid if deep and bool(torch.rand(1, generator=g) < 0.7) else [])
            rows.append(base + new(int(torch.randint(1, 3, (1,), generator=g))))
            last = int(torch.randint(1, bs + 1, (1,), generator=g))  # tokens in the last block
            seqs.append(max(q_len, (len(rows[-1]) - 1) * bs + last))
    width = max(len(r) for r in rows) + 2
    tab = torch.zeros(len(rows), width, dtype=torch.int32)
    for i, r in enumerate(rows):
        tab[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
    qo = torch.arange(len(rows) + 1, dtype=torch.int32) * q_len
    return tab, torch.tensor(seqs, dtype=torch.int32), qo, nxt[0]


def _max_depth(meta) -> int:
    return int((meta.vis_indptr[1:] - meta.vis_indptr[:-1]).max())


@pytest.mark.parametrize("seed", range(8))
def test_capacity_bounds_every_plan(seed):
    """fixed_plan_capacity bounds the default plan of any forest whose rows see <= depth nodes, for any
    node lengths, worker counts, GQA, head dims and windows (the argument in its docstring)."""
    g = torch.Generator().manual_seed(100 + seed)
    for case in range(6):
        bs = (1, 4, 16)[case % 3]
        q_len = int(torch.randint(1, 4, (1,), generator=g))
        tab, seq, qo, _ = _batch(seed * 10 + case, bs, max_reqs=int(torch.randint(1, 24, (1,), generator=g)),
                                 q_len=q_len, deep=case % 2 == 1, long=case >= 3)
        meta = forest_from_block_table(tab, seq, qo, bs)
        assert _max_depth(meta) <= GRAPH_DEPTH
        total_q = int(qo[-1]) + int(torch.randint(0, 4, (1,), generator=g))
        for hq, hk, d in ((8, 2, 64), (32, 8, 128), (4, 4, 256), (16, 1, 128)):
            for nw in (1, 2, 7, 264):
                for window in (None, 5):
                    cap = fixed_plan_capacity(total_q, hq, hk, d, nw)
                    plan = plan_tree_attention(meta, hq, hk, head_dim=d, num_workers=nw, window=window)
                    assert plan.num_readers <= cap.readers
                    assert plan.num_items <= cap.items, (plan.num_items, cap)
                    assert plan.num_partials <= cap.partials, (plan.num_partials, cap)
                    assert plan.num_merge_rows <= cap.merge_rows


def _inputs(num_pages: int, bs: int, hq: int, hk: int, d: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_pages, bs, hk, d, generator=g).to(dtype).to(device)
    v = torch.randn(num_pages, bs, hk, d, generator=g).to(dtype).to(device)
    return k, v


def _reference(q, k, v, meta, **variant):
    return mk.tree_attention(q.double(), k.double(), v.double(), meta.to("cpu"), backend="reference",
                             return_lse=True, **variant)


def _steps(bs: int, n: int):
    """Steps replayed through one capture of ``n`` rows: decodes with sharing, deeper sharing, fewer real
    rows than n (graph padding), nothing shared, and a chain whose rows see more than GRAPH_DEPTH nodes
    on average (more readers than the capacity: runs unshared, the fallback)."""
    steps = [_batch(1, bs, max_reqs=n), _batch(2, bs, max_reqs=n - 3, deep=True), _batch(3, bs, max_reqs=1)]
    tab, seq, qo, pages = _batch(4, bs, max_reqs=n // 2)
    steps.append((torch.arange(1, tab.numel() + 1, dtype=torch.int32).view_as(tab), seq, qo,
                  tab.numel() + 1))  # every block its own: nothing shared
    # a chain: request i shares the blocks of request i - 1 and adds one, so its row sees i + 2 nodes
    reqs = n
    assert sum(i + 2 for i in range(reqs)) > GRAPH_DEPTH * n
    tab = torch.zeros(reqs, reqs + 1, dtype=torch.int32)
    for i in range(reqs):
        tab[i, : i + 1] = torch.arange(1, i + 2, dtype=torch.int32)
        tab[i, i + 1] = 200 + i
    seq = torch.tensor([(i + 1) * bs + 1 for i in range(reqs)], dtype=torch.int32)
    steps.append((tab, seq, torch.arange(reqs + 1, dtype=torch.int32), 200 + reqs))
    return steps


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("variant", [{}, {"window": 9, "softcap": 3.0}], ids=["plain", "window+softcap"])
def test_replay_with_captured_objects_computes_each_new_step(backend, variant):
    bs, n, hq, hk, d = 4, 12, 8, 2, 64
    key = (hq, hk, d, variant.get("window", 0))
    steps = _steps(bs, n)
    num_pages = max(s[3] for s in steps) + 1
    k, v = _inputs(num_pages, bs, hq, hk, d, torch.float32, "cpu")
    bufs = FixedStepBuffers(max_tokens=16, max_pages=256, device="cpu", num_workers=2)
    q = torch.empty(n, hq, d)  # the graph's fixed input buffer
    captured = None
    fallbacks = 0
    for i, (tab, seq, qo, _) in enumerate(steps):
        forest = forest_from_block_table(tab, seq, qo, bs)
        meta, plans = bufs.fill(forest, n, [key], lambda t=tab, s=seq, o=qo: forest_from_block_table(
            t, s, o, bs, share=False))
        assert bufs.fallbacks == fallbacks + (i == len(steps) - 1)
        fallbacks = bufs.fallbacks
        if captured is None:
            captured = (meta, plans[key])
        else:  # the buffers did not move
            for a, b in zip([*meta.tensors(), meta.node_pos], [*captured[0].tensors(), captured[0].node_pos],
                            strict=True):
                assert a.data_ptr() == b.data_ptr()
            for a, b in zip(plans[key].tensors(), captured[1].tensors(), strict=True):
                assert a.data_ptr() == b.data_ptr()
        q.copy_(torch.randn(n, hq, d, generator=torch.Generator().manual_seed(i)))
        q[int(qo[-1]):] = float("nan")  # padding rows: whatever is there must not leak
        out, lse = mk.tree_attention(q, k, v, captured[0], plan=captured[1], backend=backend, validate=False,
                                     return_lse=True, **variant)
        rows = int(qo[-1])
        want, want_lse = _reference(q[:rows], k, v, forest, **variant)
        torch.testing.assert_close(out[:rows].double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[:rows].double(), want_lse.double(), rtol=1e-5, atol=1e-5)
        assert bool((out[rows:] == 0).all()) and bool(torch.isneginf(lse[rows:]).all())


def test_fill_refuses_more_rows_than_its_buffers():
    bufs = FixedStepBuffers(max_tokens=4, max_pages=64, device="cpu", num_workers=1)
    tab, seq, qo, _ = _batch(0, 4, max_reqs=3)
    forest = forest_from_block_table(tab, seq, qo, 4)
    with pytest.raises(MetadataError, match="total_q: expected at most 4"):
        bufs.fill(forest, 5, [(4, 2, 64, 0)], lambda: forest)
    with pytest.raises(MetadataError, match="total_q: expected at least"):
        bufs.fill(forest, 2, [(4, 2, 64, 0)], lambda: forest)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graph capture)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_new_steps(backend):
    """A real capture: the forward over the fixed buffers is captured once, then each new step is filled
    into the buffers and the graph replayed."""
    if backend not in mk.available_backends("tree_attention", torch.device("cuda")):
        pytest.skip(f"backend {backend} is not built on this machine")
    bs, n, hq, hk, d = 16, 12, 8, 2, 128
    key = (hq, hk, d, 0)
    steps = _steps(bs, n)
    num_pages = max(s[3] for s in steps) + 1
    k, v = _inputs(num_pages, bs, hq, hk, d, torch.float16, "cuda")
    bufs = FixedStepBuffers(max_tokens=16, max_pages=256, device="cuda")
    q = torch.zeros(n, hq, d, dtype=torch.float16, device="cuda")

    def fill(step):
        tab, seq, qo, _ = (x.cuda() if isinstance(x, torch.Tensor) else x for x in step)
        return bufs.fill(forest_from_block_table(tab, seq, qo, bs), n, [key],
                         lambda: forest_from_block_table(tab, seq, qo, bs, share=False))

    meta, plans = fill(steps[0])
    run = lambda: mk.tree_attention(q, k, v, meta, plan=plans[key], validate=False,  # noqa: E731
                                    backend=backend, return_lse=True)
    run()  # warm-up (compiles) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = run()
    for i, step in enumerate(steps):
        fill(step)
        q.copy_(torch.randn(n, hq, d, generator=torch.Generator().manual_seed(i)).half())
        graph.replay()
        torch.cuda.synchronize()
        tab, seq, qo, _ = step
        rows = int(qo[-1])
        forest = forest_from_block_table(tab, seq, qo, bs)
        want, want_lse = _reference(q[:rows].cpu(), k.cpu(), v.cpu(), forest)
        torch.testing.assert_close(out[:rows].cpu().double(), want, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(lse[:rows].cpu().double(), want_lse.double(), rtol=2e-3, atol=2e-3)
        assert bool((out[rows:] == 0).all()) and bool(torch.isneginf(lse[rows:]).all())
