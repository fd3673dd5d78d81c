"""multiverse_kernels.distributed: context-parallel tree attention over torch.distributed.

Every multi-process test spawns its ranks (gloo on CPU, one thread each, a file:// rendezvous, a 60 s
group timeout) and runs many cases in one spawn; the parent kills the ranks after a hard deadline, so no
input can hang the suite. Each rank builds the same full q/k/v from a shared seed, runs the distributed
op on its slice, and compares out, lse and dq/dk/dv of its tokens with the single-process
``multiverse_kernels.tree_attention`` over the whole sequence (fp64 1e-10, fp32 1e-5), also with the
attention variants (sliding window by the whole forest's positions, soft-cap, sinks, all three; the sinks'
gradient summed over the ranks equals the single process's; fp8 K/V forward). ``MK_DIST_BACKEND``
=nccl runs the same cases on CUDA (one GPU per rank; the GPU entry point does it on >= 2 GPUs).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist
from _ranks import process_group, spawn_ranks

import multiverse_kernels as mk
from multiverse_kernels.dense_mask import dense_mask, key_slots
from multiverse_kernels.distributed import (
    balanced_token_ranges,
    even_token_ranges,
    exchange_stats,
    reset_exchange_stats,
    tree_attention,
)
from multiverse_kernels.distributed._plan import _row_costs, host_forest, needed_intervals, rank_plan
from multiverse_kernels.multiverse import parse
from multiverse_kernels.multiverse.synthetic import random_sequence
from multiverse_kernels.multiverse.tags import MultiverseTags
from multiverse_kernels.rl import RolloutNode, pack_group, pack_rollouts
from multiverse_kernels.testing import design_example_forest

V = 32
TAGS = MultiverseTags(*range(V, V + 10))
BACKEND = os.environ.get("MK_DIST_BACKEND", "gloo")


# ------------------------------------------------------------------------------------------ forests
def _tree(rng: random.Random, depth: int = 0) -> RolloutNode:
    kids = [_tree(rng, depth + 1) for _ in range(rng.randint(0, 3 if depth < 2 else 0))]
    return RolloutNode([1] * rng.randint(1, 12), kids, trainable=bool(depth))


def _two_sequences(a: int, b: int) -> mk.ForestMetadata:
    """Two independent packed sequences: a rank holding exactly the second sees nothing remote."""
    i32 = dict(dtype=torch.int32)
    ip = torch.tensor([0, a, a + b], **i32)
    return mk.ForestMetadata(ip, torch.arange(a + b, **i32), torch.tensor([a, b], **i32), ip.clone(),
                             torch.tensor([0, 1, 2], **i32), torch.tensor([0, 1], **i32), page_size=1)


def forests(seed: int) -> list[tuple[str, mk.ForestMetadata]]:
    rng = random.Random(seed)
    out = []
    for i in range(2):
        s = parse(random_sequence(seed * 10 + i, TAGS, vocab=V, max_depth=2, max_paths=3, max_text=8), TAGS)
        out.append((f"multiverse[{seed * 10 + i}]", s.metadata()))
    out.append(("grpo", pack_group(list(range(rng.randint(5, 40))),
                                   [[1] * rng.randint(1, 20) for _ in range(rng.randint(2, 8))]).metadata()))
    out.append(("multi-turn", pack_rollouts(_tree(rng)).metadata()))
    m = out[0][1]
    full = torch.rand(m.num_groups, generator=torch.Generator().manual_seed(seed)) < 0.5
    out.append(("own_full", m.with_own_full(full)))
    return out


def _ranges(meta: mk.ForestMetadata, world: int, kind: str, seed: int) -> list[tuple[int, int]] | None:
    L = meta.total_q
    if kind == "even":
        return None
    if kind == "balanced":
        return balanced_token_ranges(meta, world)
    rng = random.Random(seed)  # uneven, an empty range sometimes
    cuts = sorted(rng.randint(0, L) for _ in range(world - 1))
    if world > 2 and rng.random() < 0.5:
        cuts[0] = cuts[1]
    return list(zip([0] + cuts, cuts + [L]))


# ------------------------------------------------------------------------------------------- worker
def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if BACKEND == "nccl" else torch.device("cpu")


def _check_case(meta, ranges, dtype, *, overlap=None, lse_grad=False, seed=0, hq=4, hk=2, d=16, group=None,
                window=None, softcap=None, sinks=False):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = _device()
    L = meta.total_q
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(L, h, d, generator=g, dtype=torch.float64) for h in (hq, hk, hk))
    w_out = torch.randn(L, hq, d, generator=g, dtype=torch.float64)
    w_lse = torch.randn(L, hq, generator=g, dtype=torch.float64) if lse_grad else None
    q, k, v, w_out = (t.to(dtype).to(dev) for t in (q, k, v, w_out))
    # sink logits around the rows' lse, so they matter (float64 sinks for float64 q, as models pass them)
    sk = (torch.randn(hq, generator=g, dtype=torch.float64) + 2.0).to(
        torch.float64 if dtype == torch.float64 else torch.float32).to(dev) if sinks else None
    meta_d = meta.to(dev)
    var = dict(window=window, softcap=softcap)
    # single-process reference over the whole sequence
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    sf = None if sk is None else sk.clone().requires_grad_()
    out, lse = mk.tree_attention(qf, kf[:, None], vf[:, None], meta_d, return_lse=True, sinks=sf, **var)
    loss = (out * w_out).sum() + ((lse * w_lse.to(lse)).sum() if lse_grad else 0)
    loss.backward()
    s, e = (ranges or even_token_ranges(L, world))[rank]
    ql, kl, vl = (t[s:e].clone().requires_grad_() for t in (q, k, v))
    sl = None if sk is None else sk.clone().requires_grad_()
    o, ls = tree_attention(ql, kl, vl, meta_d, group=group, token_ranges=ranges, return_lse=True,
                           overlap=overlap, sinks=sl, **var)
    (((o * w_out[s:e]).sum() + ((ls * w_lse[s:e].to(ls)).sum() if lse_grad else 0)) * 1.0).backward()
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    ltol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o, out[s:e].detach(), **tol)
    torch.testing.assert_close(ls, lse[s:e].detach(), **ltol)
    for name, a, b in (("dq", ql, qf), ("dk", kl, kf), ("dv", vl, vf)):
        torch.testing.assert_close(a.grad, b.grad[s:e], **tol, msg=lambda m, n=name: f"{n}: {m}")
    if sk is not None:
        # each rank's sinks gradient is its rows' share: summed over the ranks (what a trainer's gradient
        # all-reduce does) it is the single process's (computed in float32 by both ops: float32 tolerance)
        assert sl.grad is not None and sl.grad.shape == sk.shape
        total = sl.grad.clone()
        dist.all_reduce(total, group=group)
        torch.testing.assert_close(total, sf.grad, **ltol, msg=lambda m: f"dsinks: {m}")


def _expect_error(fn, *, match: str) -> None:
    try:
        fn()
    except mk.MetadataError as ex:
        assert match in str(ex), f"expected {match!r} in {ex}"
        return
    raise AssertionError(f"no MetadataError raised (expected {match!r})")


def _cases_exact(world: int, seeds: list[int]) -> None:
    for seed in seeds:
        for name, meta in forests(seed):
            for kind in ("even", "uneven", "balanced"):
                ranges = _ranges(meta, world, kind, seed)
                for dtype, overlap in ((torch.float64, None), (torch.float32, None), (torch.float32, False)):
                    try:
                        _check_case(meta, ranges, dtype, overlap=overlap, lse_grad=(seed % 2 == 1), seed=seed)
                    except Exception as ex:
                        raise AssertionError(f"{name} ranges={kind}:{ranges} {dtype} overlap={overlap}: "
                                             f"{ex}") from ex
    # a rank whose rows see nothing remote: the last rank holds exactly the second sequence
    meta = _two_sequences(30, 25 + 5 * world)
    L = meta.total_q
    cuts = sorted({*(int(30 * i / (world - 1)) for i in range(1, world - 1)), 30})
    ranges = list(zip([0] + cuts, cuts + [L]))
    for dtype in (torch.float64, torch.float32):
        _check_case(meta, ranges, dtype)


def _cases_variants(world: int, seeds: list[int]) -> None:
    """Window (by the whole forest's positions), soft-cap, sinks and all three on every forest kind
    (Multiverse samples with joins and Multiverse positions, GRPO groups, multi-turn trees, own-full
    groups), the range kinds in turn, fp64 and fp32 (fp32: the overlapped path without a window)."""
    kinds = ("even", "uneven", "balanced")
    for seed in seeds:
        rng = random.Random(seed + 100)
        for i, (name, meta) in enumerate(forests(seed)):
            if name == "own_full" or i == 1:  # and the default positions (no node_pos)
                meta, name = meta.with_node_pos(None), name + "/default-pos"
            w = rng.choice([1, 2, rng.randint(3, 10)])
            variants = [dict(window=w), dict(softcap=1.5), dict(sinks=True),
                        dict(window=rng.randint(2, 8), softcap=2.0, sinks=True)]
            for j, var in enumerate(variants):
                kind = kinds[(i + j) % 3]
                ranges = _ranges(meta, world, kind, seed + j)
                for dtype, overlap in ((torch.float64, None), (torch.float32, None)):
                    try:
                        _check_case(meta, ranges, dtype, overlap=overlap, lse_grad=(j % 2 == 1),
                                    seed=seed + j, **var)
                    except Exception as ex:
                        raise AssertionError(f"{name} {var} ranges={kind}:{ranges} {dtype}: {ex}") from ex
    # sinks on the one-call path in fp32, and a rank whose rows see nothing remote, with every variant
    meta = _two_sequences(30, 25 + 5 * world)
    L = meta.total_q
    cuts = sorted({*(int(30 * i / (world - 1)) for i in range(1, world - 1)), 30})
    ranges = list(zip([0] + cuts, cuts + [L]))
    _check_case(meta, ranges, torch.float32, overlap=False, sinks=True, softcap=3.0)
    _check_case(meta, ranges, torch.float64, window=4, sinks=True, softcap=3.0)
    # fp8 K/V (forward only; float16 q): the fp8 bytes are exchanged
    _check_fp8(forests(seeds[0])[0][1], world)


def _check_fp8(meta, world: int) -> None:
    import warnings

    dev = _device()
    rank = dist.get_rank()
    L = meta.total_q
    g = torch.Generator().manual_seed(5)
    q = torch.randn(L, 4, 16, generator=g).half().to(dev)
    k, v = (torch.randn(L, 2, 16, generator=g).to(dev).to(torch.float8_e4m3fn) for _ in range(2))
    ks, vs = torch.tensor([0.5], device=dev), torch.tensor([1.5, 0.75], device=dev)
    s, e = even_token_ranges(L, world)[rank]
    for var in (dict(), dict(window=5, sinks=torch.randn(4, generator=g).to(dev))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # auto may run the reference (it warns)
            want = mk.tree_attention(q, k[:, None], v[:, None], meta.to(dev), k_scale=ks, v_scale=vs, **var)
            ql = q[s:e].clone().requires_grad_()
            got = tree_attention(ql, k[s:e], v[s:e], meta.to(dev), k_scale=ks, v_scale=vs, **var)
            torch.testing.assert_close(got, want[s:e], atol=2e-3, rtol=2e-3,
                                       msg=lambda m, a=var: f"fp8 {a}: {m}")
            try:  # forward only, as in the single-process op (no collective in the backward: no hang)
                got.float().sum().backward()
            except NotImplementedError as ex:
                assert "fp8" in str(ex), ex
            else:
                raise AssertionError("fp8: the backward did not raise NotImplementedError")


def _cases_bytes(world: int) -> None:
    meta = pack_group(list(range(64)), [[1] * 16 for _ in range(8)]).metadata()
    hk, d = 2, 16
    reset_exchange_stats()
    _check_case(meta, None, torch.float32, hk=hk, d=d)
    st = exchange_stats()
    L = meta.total_q
    row = 2 * hk * d * 4  # K and V of one token, fp32
    allgather = (world - 1) * (L // world) * row  # what every rank would send to all-gather its K/V
    plan = rank_plan(host_forest(meta), even_token_ranges(L, world), dist.get_rank(), torch.device("cpu"))
    assert st["forward_bytes_sent"] == sum(plan.send_splits) * row  # exactly the slices others need
    assert st["backward_bytes_sent"] == sum(plan.recv_splits) * row  # exactly the dK/dV of fetched ones
    assert st["forward_bytes_sent"] <= allgather, (st, allgather)  # a rank holding the prompt sends it all
    total = torch.tensor([st["forward_bytes_sent"], allgather])
    dist.all_reduce(total)
    assert 0 < int(total[0]) < int(total[1]), total.tolist()  # but in all, less moves


def _cases_errors(world: int) -> None:
    rank = dist.get_rank()
    meta = pack_group(list(range(20)), [[1] * 7 for _ in range(4)]).metadata()
    L = meta.total_q
    s, e = even_token_ranges(L, world)[rank]
    q, k = torch.randn(L, 4, 8), torch.randn(L, 2, 8)
    # a rank whose tensors do not match its range: every rank raises
    bad = e - s - (1 if rank == world - 1 else 0)
    _expect_error(lambda: tree_attention(q[s:s + bad], k[s:s + bad], k[s:s + bad], meta),
                  match=f"rank {world - 1}: ")
    # ranges that do not tile the sequence
    _expect_error(lambda: tree_attention(q[s:e], k[s:e], k[s:e], meta,
                                         token_ranges=[(0, 1)] * world), match="token_ranges")
    _expect_error(lambda: tree_attention(q[s:e], k[s:e], k[s:e], meta,
                                         token_ranges=even_token_ranges(L + 1, world)), match="token_ranges")
    # metadata that differs between ranks (same length): the hash check
    other = pack_group(list(range(20)), [[1] * 8, [1] * 6, [1] * 7, [1] * 7]).metadata()
    _expect_error(lambda: tree_attention(q[s:e], k[s:e], k[s:e], other if rank == 0 else meta),
                  match="differ between ranks")
    # bad variant arguments: every rank raises, naming the argument
    _expect_error(lambda: tree_attention(q[s:e], k[s:e], k[s:e], meta, window=0), match="window")
    _expect_error(lambda: tree_attention(q[s:e], k[s:e], k[s:e], meta, softcap=-1.0), match="softcap")
    _expect_error(lambda: tree_attention(q[s:e], k[s:e], k[s:e], meta, sinks=torch.zeros(3)), match="sinks")
    _expect_error(lambda: tree_attention(q[s:e], k[s:e], k[s:e], meta,
                                         sinks=torch.zeros(4, dtype=torch.float16)), match="sinks")
    k8 = k.to(torch.float8_e4m3fn)
    _expect_error(lambda: tree_attention(q[s:e].half(), k8[s:e], k8[s:e], meta), match="k_scale")
    _expect_error(lambda: tree_attention(q[s:e], k8[s:e], k8[s:e], meta, k_scale=torch.ones(1),
                                         v_scale=torch.ones(1)), match="q: an fp8 KV cache")
    # a variant that differs between ranks: the hash check
    _expect_error(lambda: tree_attention(q[s:e], k[s:e], k[s:e], meta, window=4 if rank == 0 else 5),
                  match="differ between ranks")
    _expect_error(lambda: tree_attention(q[s:e], k[s:e], k[s:e], meta,
                                         sinks=torch.zeros(4) if rank == 0 else None),
                  match="differ between ranks")
    # a forest that is not packed (page size 4)
    f, groups = design_example_forest()
    _expect_error(lambda: tree_attention(q[s:e], k[s:e], k[s:e], f.metadata(groups)), match="page_size")
    # still usable after the errors
    _check_case(meta, None, torch.float64)
    # a group of size one falls back to the local op on the whole sequence
    singles = [dist.new_group([r], backend=BACKEND) for r in range(world)]
    _check_case(meta, None, torch.float64, group=singles[rank])
    _expect_error(lambda: tree_attention(q[:-1], k[:-1], k[:-1], meta, group=singles[rank]),
                  match="q: expected")


def _tiny_model(transformers, family: str):
    """Tiny random models: Qwen2 (plain), Gemma 2 (sliding window + soft-cap, float64) and GPT-OSS (sliding
    window + sinks, float32: its MoE GEMMs take no float64)."""
    common = dict(vocab_size=V + 10, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).double()
    layers = ["sliding_attention", "full_attention"]
    if family == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=8, sliding_window=5, attn_logit_softcapping=3.0,
                                        final_logit_softcapping=None, query_pre_attn_scalar=8,
                                        layer_types=layers)
        return transformers.Gemma2ForCausalLM(cfg).double()
    cfg = transformers.GptOssConfig(**dict(common, intermediate_size=16), head_dim=8, sliding_window=5,
                                    num_local_experts=2, num_experts_per_tok=1, layer_types=layers)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return model


def _cases_transformers(world: int) -> None:
    """``packed_forward`` with a group equals one process (logits, all-reduced parameter gradients) on a
    plain model and on models whose attention needs the variants: Gemma 2 (window by the Multiverse
    positions + soft-cap) and GPT-OSS (window + sinks, whose gradient is summed over the ranks)."""
    if BACKEND == "nccl":  # the model runs on the CPU here
        return
    import warnings

    transformers = pytest.importorskip("transformers")
    from multiverse_kernels.integrations.transformers import packed_forward

    # (logits, gradients) tolerances: Gemma 2's RMSNorm runs in float32 (its weight gradients are
    # float32 sums over the tokens), GPT-OSS is a float32 model
    for family, tol, gtol in (("qwen2", 1e-10, 1e-9), ("gemma2", 1e-10, 1e-5), ("gpt_oss", 1e-5, 1e-4)):
        torch.manual_seed(0)
        model = _tiny_model(transformers, family)
        s = parse(random_sequence(7, TAGS, vocab=V, max_depth=2, max_paths=3, max_text=8), TAGS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a variant may run on the reference (it warns)
            full = packed_forward(model, s)
            w = torch.randn(full.shape, generator=torch.Generator().manual_seed(1), dtype=full.dtype)
            (full * w).sum().backward()
            want = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
            model.zero_grad()
            ranges = balanced_token_ranges(s.metadata(), world)
            a, b = ranges[dist.get_rank()]
            part = packed_forward(model, s, group=dist.group.WORLD, token_ranges=ranges)
            torch.testing.assert_close(part, full[a:b].detach(), atol=tol, rtol=tol)
            (part * w[a:b]).sum().backward()
        for (name, p), g in zip(model.named_parameters(), want):
            if g is None:  # (an expert no token was routed to)
                continue
            grad = p.grad if p.grad is not None else torch.zeros_like(g)
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, g, atol=gtol, rtol=gtol,
                                       msg=lambda m, f=family, n=name: f"{f} {n}: {m}")
        if family == "gpt_oss":
            assert any(n.endswith("sinks") and p.grad is not None and p.grad.abs().sum() > 0
                       for n, p in model.named_parameters())


CASES = {"exact": _cases_exact, "variants": _cases_variants, "bytes": _cases_bytes, "errors": _cases_errors,
         "transformers": _cases_transformers}


def _worker(rank: int, world: int, init: str, cases: list[tuple[str, tuple]]) -> None:
    with process_group(BACKEND, rank, world, init):
        for name, args in cases:
            CASES[name](world, *args)


def run_ranks(world: int, cases: list[tuple[str, tuple]], tmp_path, timeout: float = 240.0) -> None:
    """Spawn ``world`` ranks running ``cases``; fail (and kill them) after ``timeout`` seconds."""
    if BACKEND == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"nccl: needs {world} GPUs, found {torch.cuda.device_count()}")
    spawn_ranks(_worker, (world, f"file://{tmp_path}/rendezvous", cases), world, timeout)


# -------------------------------------------------------------------------------------------- tests
def test_two_ranks_exact_bytes_and_errors(tmp_path):
    run_ranks(2, [("exact", ([0, 1],)), ("variants", ([0],)), ("bytes", ()), ("errors", ())], tmp_path)


def test_three_ranks_exact(tmp_path):
    run_ranks(3, [("exact", ([2],)), ("variants", ([2],)), ("errors", ())], tmp_path)


def test_two_ranks_transformers_packed_forward(tmp_path):
    pytest.importorskip("transformers")
    run_ranks(2, [("transformers", ())], tmp_path)


@pytest.mark.slow
def test_four_ranks_exact(tmp_path):
    run_ranks(4, [("exact", ([3, 4, 5],)), ("variants", ([3, 4],)), ("bytes", ()), ("errors", ())], tmp_path,
              timeout=480)


@pytest.mark.slow
def test_three_ranks_more_forests(tmp_path):
    run_ranks(3, [("exact", ([6, 7, 8, 9],)), ("variants", ([6, 7],)), ("transformers", ())], tmp_path,
              timeout=480)


# ------------------------------------------------------------------------------- in-process checks
def test_balanced_ranges_even_out_the_work():
    meta = pack_group(list(range(400)), [[1] * 100 for _ in range(8)]).metadata()
    cost = _row_costs(host_forest(meta))
    for world in (2, 3, 4):
        def worst(rs):
            return max(int(cost[a:b].sum()) for a, b in rs)
        bal = balanced_token_ranges(meta, world)
        assert bal[0][0] == 0 and bal[-1][1] == meta.total_q
        assert all(a[1] == b[0] for a, b in zip(bal, bal[1:]))
        assert worst(bal) < worst(even_token_ranges(meta.total_q, world))
        assert worst(bal) <= 1.05 * int(cost.sum()) / world + int(cost.max())


def _token_positions(meta: mk.ForestMetadata) -> torch.Tensor:
    """int64 [L]: every token's position (node_pos, or the default, of the whole forest)."""
    pos = meta.positions().long()
    out = torch.zeros(meta.total_q, dtype=torch.int64)
    ip, pages = meta.node_page_indptr.tolist(), meta.node_page_indices.long()
    for n, ln in enumerate(meta.node_len.tolist()):
        out[pages[ip[n]: ip[n] + ln]] = pos[n] + torch.arange(ln)
    return out


def test_window_costs_and_exchange_follow_the_dense_mask():
    """With a window: every row's cost is its count of keys visible by the forest and the window (dense
    check), and the keys a rank fetches are exactly the remote keys some local row sees."""
    for seed in (0, 1, 2):
        for name, meta in forests(seed):
            f = host_forest(meta)
            tok = _token_positions(meta)
            mask = torch.zeros(meta.total_q, meta.total_q, dtype=torch.bool)
            mask[:, key_slots(meta)] = dense_mask(meta)
            for w in (1, 3, 8):
                seen = mask & (tok[:, None] - tok[None, :] < w)
                assert torch.equal(_row_costs(f, w), seen.sum(1)), (name, w)
                for a, b in even_token_ranges(meta.total_q, 3):
                    want = torch.nonzero(seen[a:b].any(0)).flatten().tolist()
                    want = [t for t in want if not a <= t < b]
                    got = [t for lo, hi in needed_intervals(f, a, b, w) for t in range(lo, hi)]
                    assert got == want, (name, w, (a, b))
            assert torch.equal(_row_costs(f), mask.sum(1)), name
            bal = balanced_token_ranges(meta, 2, window=3)
            assert bal[0][0] == 0 and bal[-1][1] == meta.total_q


def test_needs_distributed_initialisation():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    meta = pack_group([1, 2], [[3]]).metadata()
    x = torch.randn(3, 1, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        tree_attention(x, x, x, meta)
