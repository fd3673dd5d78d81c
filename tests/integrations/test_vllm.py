"""The vLLM backend (multiverse_kernels.integrations.vllm): block tables -> forest, plugin selection and
refusals, and whole generations against vLLM's own CPU backend (CPU_ATTN) on tiny random models.

The first group (block tables -> forest) needs no vLLM. The rest needs vLLM's CPU build (pinned in CI's
third environment, .ci/run) and skip with the reason elsewhere. Engines are tiny (2 layers, random
weights saved to a temp dir, enforce_eager, skip_tokenizer_init, block size 32) and run in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), except the plugin-in-a-spawned-engine test.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels._native import host_op
from multiverse_kernels.integrations.vllm_sharing import forest_from_block_table

# ----------------------------------------------------------------- block tables -> forest (no vLLM)

# Both conversions: csrc/block_tables.cpp (the CPU default) and the vectorised torch code (the spec).
NO_CPP = host_op("forest_from_block_table") is None
NO_CPP_WHY = "the C++ extension multiverse_kernels._C is not built"
IMPLS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(NO_CPP, reason=NO_CPP_WHY))]


def _tables(seed: int, bs: int = 4):
    """Random requests over prefix-shared block lists: a few prompts, each with several continuations,
    some of which share more blocks, plus unrelated requests; random query lengths."""
    g = torch.Generator().manual_seed(seed)
    nxt = [0]

    def new(n):
        r = torch.arange(nxt[0], nxt[0] + n)
        nxt[0] += n
        return r

    rows, seqs, qls = [], [], []
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        prompt = new(int(torch.randint(0, 6, (1,), generator=g)))
        mid = new(int(torch.randint(0, 3, (1,), generator=g)))
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            base = torch.cat([prompt, mid]) if bool(torch.rand(1, generator=g) < 0.5) else prompt
            own = int(torch.randint(1, 4, (1,), generator=g))
            rows.append(torch.cat([base, new(own)]))
            last = int(torch.randint(1, bs + 1, (1,), generator=g))
            seqs.append((len(rows[-1]) - 1) * bs + last)
            qls.append(int(torch.randint(1, min(seqs[-1] - len(base) * bs, 2 * bs) + 1, (1,), generator=g)))
    perm = torch.randperm(len(rows), generator=g).tolist()
    rows, seqs, qls = [rows[i] for i in perm], [seqs[i] for i in perm], [qls[i] for i in perm]
    width = max(len(r) for r in rows) + 3
    tab = torch.full((len(rows) + 2, width), 7, dtype=torch.int32)  # padding rows/columns hold junk
    for i, r in enumerate(rows):
        tab[i, : len(r)] = r.to(torch.int32)
    qo = torch.zeros(len(rows) + 1, dtype=torch.int32)
    qo[1:] = torch.cumsum(torch.tensor(qls), 0)
    return tab, torch.tensor(seqs, dtype=torch.int32), qo, nxt[0] + 8


def _attend(meta, qo, num_pages, bs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(int(qo[-1]), 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(num_pages, bs, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(num_pages, bs, 2, 16, generator=g, dtype=torch.float64)
    return mk.tree_attention(q, k, v, meta, backend="reference")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("impl", IMPLS)
def test_block_tables_share_prefixes_exactly(seed, impl):
    bs = 4
    tab, seq, qo, num_pages = _tables(seed, bs)
    shared, st = forest_from_block_table(tab, seq, qo, bs, stats=True, impl=impl)
    alone = forest_from_block_table(tab, seq, qo, bs, share=False, impl=impl)
    shared.validate(num_pages)
    alone.validate(num_pages)
    assert not st.fallback
    torch.testing.assert_close(_attend(shared, qo, num_pages, bs), _attend(alone, qo, num_pages, bs),
                               rtol=0, atol=1e-12)
    # every block is read once: the forest's pages are the unique blocks of the tables
    need = -(-shared.node_len.long() // bs)
    assert int(need.sum()) == st.unique_blocks == int(torch.unique(alone.node_page_indices).numel())
    assert shared.node_page_indices.numel() == st.unique_blocks
    torch.testing.assert_close(shared.positions(), shared.default_node_pos())


def _same_forest(a, st_a, b, st_b) -> None:
    from dataclasses import fields

    assert st_a == st_b
    for f in fields(b):
        x, y = getattr(a, f.name), getattr(b, f.name)
        same = (torch.equal(x, y) and x.dtype == y.dtype) if isinstance(y, torch.Tensor) else x == y
        assert same, f.name


@pytest.mark.skipif(NO_CPP, reason=NO_CPP_WHY)
@pytest.mark.parametrize("seed", range(40))
def test_block_tables_cpp_equals_torch(seed):
    """csrc/block_tables.cpp gives the torch spec's forest and stats, field for field, on prefix-shared
    tables (_tables) and on random tables drawn from a small pool of block ids (repeats at other
    positions, runs that break the prefix property: the fallback), with junk or -1 past each request's
    blocks, int64 inputs, sparse ids, a strided table, share on and off, and 0-6 requests."""
    g = torch.Generator().manual_seed(seed)
    bs = int(torch.randint(1, 6, (1,), generator=g))
    if seed % 2:
        tab, seq, qo, _ = _tables(seed, bs)
    else:
        R = int(torch.randint(0, 7, (1,), generator=g))
        width = int(torch.randint(1, 6, (1,), generator=g))
        tab = torch.randint(0, 6, (R + 1, width + 2), generator=g, dtype=torch.int32)
        if seed % 4 == 0 and R:  # mostly one prefix, a few rows diverging
            tab[1:R] = tab[0]
            tab[1:R, -3:] = torch.randint(6, 60, (R - 1, 3), generator=g, dtype=torch.int32)
        seq = torch.randint(0, width * bs + 1, (R,), generator=g, dtype=torch.int32)
        ql = torch.minimum(torch.randint(0, 2 * bs, (R,), generator=g, dtype=torch.int32), seq)
        qo = torch.zeros(R + 1, dtype=torch.int32)
        qo[1:] = torch.cumsum(ql, 0)
    padded = tab.clone()
    nblk = (seq.long() + bs - 1) // bs
    for r in range(seq.numel()):
        padded[r, int(nblk[r]):] = -1  # padding past each request's blocks
    variants = [(tab, seq, qo), (tab.long(), seq.long(), qo.long()), (padded, seq, qo),
                (tab + 1_000_000, seq, qo),  # ids too sparse for a dense count: the hash map
                (torch.cat([tab, tab], 1)[:, ::2], seq, torch.cat([qo, qo[-1:] + 3]))]  # strided, longer qo
    for t, s, q in variants:
        for share in (True, False):
            got = forest_from_block_table(t, s, q, bs, share=share, stats=True, impl="cpp")
            want = forest_from_block_table(t, s, q, bs, share=share, stats=True, impl="torch")
            _same_forest(*got, *want)


@pytest.mark.skipif(NO_CPP, reason=NO_CPP_WHY)
def test_block_tables_cpp_refuses_bad_input():
    op = host_op("forest_from_block_table")
    tab = torch.zeros(2, 2, dtype=torch.int32)
    seq, qo = torch.tensor([8, 8], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block_table: expected at least ceil"):
        op(tab, seq, qo, 2, True)  # 4 blocks each, 2 columns
    with pytest.raises(RuntimeError, match="seq_lens: expected non-negative"):
        op(tab, -seq, qo, 4, True)
    with pytest.raises(RuntimeError, match="block_size: expected a positive"):
        op(tab, seq, qo, 0, True)
    with pytest.raises(RuntimeError, match="query_start_loc: expected at least"):
        op(tab, seq, qo[:2], 4, True)
    with pytest.raises(RuntimeError, match="block_table: expected non-negative block ids"):
        op(torch.full((2, 2), -1, dtype=torch.int32), seq, qo, 4, True)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_tables_known_split(impl):
    bs = 4
    # three requests on a 2-block prompt; two of them share one more block; one unrelated request
    tab = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 5, 0], [6, 7, 0, 0]], dtype=torch.int32)
    seq = torch.tensor([14, 13, 10, 5], dtype=torch.int32)
    qo = torch.tensor([0, 1, 2, 3, 8], dtype=torch.int32)
    m, st = forest_from_block_table(tab, seq, qo, bs, stats=True, impl=impl)
    assert m.node_len.tolist() == [8, 4, 2, 1, 2, 5]
    assert m.node_page_indices.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert m.vis_nodes.tolist() == [0, 1, 2, 0, 1, 3, 0, 4, 5]
    assert (st.listed_blocks, st.unique_blocks, st.shared_nodes) == (13, 8, 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_tables_query_rows_are_never_shared(impl):
    # the same 2 blocks, but request 1's query reaches into block 1: only block 0 is shared
    tab = torch.tensor([[0, 1, 2], [0, 1, 3]], dtype=torch.int32)
    seq = torch.tensor([9, 12], dtype=torch.int32)
    qo = torch.tensor([0, 1, 6], dtype=torch.int32)
    m = forest_from_block_table(tab, seq, qo, 4, impl=impl)
    assert m.node_len.tolist() == [4, 5, 8] and m.vis_nodes.tolist() == [0, 1, 0, 2]
    m.validate(4)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_tables_break_the_prefix_property_fall_back(impl):
    # block 9 at different positions, and block 3 starting runs of different lengths: not a prefix tree
    cases = (([[9, 1, 2], [3, 9, 4], [9, 1, 5]], False), ([[9, 1, 2], [3, 9, 4], [3, 7, 5]], True))
    for rows, fallback in cases:
        tab = torch.tensor(rows, dtype=torch.int32)
        seq = torch.tensor([12, 12, 12], dtype=torch.int32)
        qo = torch.arange(4, dtype=torch.int32)
        m, st = forest_from_block_table(tab, seq, qo, 4, stats=True, impl=impl)
        alone = forest_from_block_table(tab, seq, qo, 4, share=False, impl=impl)
        assert st.fallback == fallback
        m.validate(10)
        torch.testing.assert_close(_attend(m, qo, 10, 4), _attend(alone, qo, 10, 4), rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_tables_nothing_shared_is_one_node_per_request(impl):
    tab = torch.tensor([[0, 1], [2, 3], [4, 0]], dtype=torch.int32)
    seq = torch.tensor([5, 8, 0], dtype=torch.int32)
    qo = torch.tensor([0, 1, 9, 9], dtype=torch.int32)
    m, st = forest_from_block_table(tab, seq, qo, 4, stats=True, impl=impl)
    assert m.num_nodes == 3 and m.vis_nodes.tolist() == [0, 1, 2] and st.shared_nodes == 0
    assert m.node_page_indices.tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------ vLLM engines

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def vllm_mod():
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    return pytest.importorskip("vllm", reason="vLLM is not installed (CI's third environment has it)")


def _save_tiny(tmp_path, arch: str = "qwen2", dtype=torch.float32, **over) -> str:
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=True)
    common.update(over)
    cfg_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM),
    }[arch]
    model = model_cls(cfg_cls(**common)).to(dtype)
    with torch.no_grad():  # GPT-OSS's sinks: large enough to move the softmax (zeros would barely matter)
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.normal_(0.0, 1.0)
    path = str(tmp_path / arch)
    model.save_pretrained(path)
    return path


def _run_engine(path: str, backend: str | None, jobs, *, dtype="float32", **kw):
    """Run every job ((prompts, SamplingParams) pairs) on one engine; per job, per request, per sample:
    (token ids, log-probs of the chosen tokens)."""
    from vllm import LLM

    args = dict(dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, max_model_len=1024,
                block_size=32, max_num_seqs=64, seed=0, enable_prefix_caching=True)
    args.update(kw)
    if backend:
        args["attention_backend"] = backend
    llm = LLM(path, **args)
    try:
        out = []
        for prompts, sp in jobs:
            res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            out.append([[(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
                         for c in r.outputs] for r in res])
        return out
    finally:
        del llm
        gc.collect()


def _compare(ours, theirs, atol):
    for job_a, job_b in zip(ours, theirs, strict=True):
        for req_a, req_b in zip(job_a, job_b, strict=True):
            for (ta, la), (tb, lb) in zip(req_a, req_b, strict=True):
                assert ta == tb
                assert max((abs(x - y) for x, y in zip(la, lb)), default=0.0) <= atol, (la, lb)


def _prompts(n_tokens: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_plugin_registers_custom_and_cpu_honours_it(vllm_mod):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from multiverse_kernels.integrations import vllm as mv

    load_general_plugins()  # the entry point (pyproject) runs register()
    assert AttentionBackendEnum.CUSTOM.get_path() == mv.BACKEND_PATH
    ok = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=32)
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, ok) == mv.BACKEND_PATH
    assert CpuPlatform.get_attn_backend_cls(None, ok).endswith("CPUAttentionBackend")  # default kept
    for bad, reason in ((ok._replace(head_size=40), "head_size"), (ok._replace(kv_cache_dtype="fp8"),
                        "kv_cache_dtype"), (ok._replace(attn_type="encoder_only"), "attention type"),
                        (ok._replace(use_sparse=True), "sparse")):
        with pytest.raises((ValueError, NotImplementedError), match=reason):
            CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, bad)
    mv.register()  # idempotent
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, ok) == mv.BACKEND_PATH


@pytest.fixture(scope="module")
def fp32_runs(vllm_mod, tmp_path_factory):
    """One pair of engines (CPU_ATTN, then ours) over every fp32 case."""
    from vllm import SamplingParams

    from multiverse_kernels.integrations import vllm as mv

    path = _save_tiny(tmp_path_factory.mktemp("m"))
    system = _prompts(100, 1)
    greedy = SamplingParams(temperature=0, max_tokens=10, logprobs=1, detokenize=False)
    jobs = [
        # n=1 greedy, and 4 requests on one prompt (they share its full blocks), beside others
        ([system], greedy),
        ([system] * 4 + [system[:40], _prompts(70, 2)], greedy),
        # many requests on a shared system prompt, each with its own question
        ([system + _prompts(5 + i, 10 + i) for i in range(8)], greedy),
        # seeded sampling, n = 4 and 16 on one prompt
        ([system + [3, 4, 5]], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, logprobs=1,
                                              detokenize=False)),
        ([system[:70]], SamplingParams(n=16, temperature=0.8, top_p=0.9, seed=11, max_tokens=6, logprobs=1,
                                       detokenize=False)),
    ]
    theirs = _run_engine(path, None, jobs)
    before = dict(mv.STATS)
    ours = _run_engine(path, "CUSTOM", jobs)
    stats = {k: mv.STATS[k] - before[k] for k in before}
    return ours, theirs, stats


def test_fp32_matches_cpu_attn_and_shares(fp32_runs):
    ours, theirs, stats = fp32_runs
    assert stats["steps"] > 0, "the CUSTOM engine did not run multiverse_kernels' backend"
    assert stats["shared_nodes"] > 0 and stats["unique_blocks"] < stats["listed_blocks"], stats
    assert stats["fallbacks"] == 0
    _compare(ours, theirs, atol=1e-3)


def test_chunked_prefill_beside_decodes(vllm_mod, tmp_path):
    """A 700-token prompt prefilled in chunks of 96 tokens while short requests decode (greedy; seeded
    sampling and chunked prefill crash vLLM's CPU runner itself)."""
    from vllm import SamplingParams

    path = _save_tiny(tmp_path, "llama")
    sp = SamplingParams(temperature=0, max_tokens=8, logprobs=1, detokenize=False)
    system = _prompts(64, 3)
    jobs = [([_prompts(700, 4)] + [system + [i] for i in range(6)], sp)]
    kw = dict(enable_chunked_prefill=True, max_num_batched_tokens=96, max_num_seqs=8)
    theirs = _run_engine(path, None, jobs, **kw)
    ours = _run_engine(path, "CUSTOM", jobs, **kw)
    _compare(ours, theirs, atol=1e-3)


def _seeded(n: int, seed: int, tokens: int = 8, **kw):
    from vllm import SamplingParams

    return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=tokens, logprobs=1, detokenize=False,
                          **kw)


def test_public_op_path_matches(vllm_mod, tmp_path, monkeypatch):
    """MULTIVERSE_VLLM_KERNEL=reference: the impl calls the public tree_attention op (the path GPU
    kernels take) instead of its direct C++ CPU path; the same tokens as CPU_ATTN."""
    from vllm import SamplingParams

    path = _save_tiny(tmp_path)
    system = _prompts(80, 6)
    jobs = [([system] * 3 + [system + [1, 2]], SamplingParams(temperature=0, max_tokens=5, logprobs=1,
                                                               detokenize=False))]
    theirs = _run_engine(path, None, jobs)
    monkeypatch.setenv("MULTIVERSE_VLLM_KERNEL", "reference")
    _compare(_run_engine(path, "CUSTOM", jobs), theirs, atol=1e-3)


def test_seeded_sampling_n_1_to_32(vllm_mod, tmp_path):
    """Seeded sampling with n = 1, 2, 8 and 32 samples of one prompt (the samples share its full blocks),
    and seeded requests with n = 5 on a shared system prompt (n = 64: the next test)."""
    from multiverse_kernels.integrations import vllm as mv

    path = _save_tiny(tmp_path)
    system = _prompts(100, 20)
    jobs = [([system], _seeded(n, 100 + n)) for n in (1, 2, 8, 32)]
    jobs.append(([system + [i] for i in range(3)], _seeded(5, 9, top_k=50)))
    theirs = _run_engine(path, None, jobs)
    before = dict(mv.STATS)
    ours = _run_engine(path, "CUSTOM", jobs)
    assert mv.STATS["shared_nodes"] > before["shared_nodes"]
    assert [len(req) for job in ours for req in job] == [1, 2, 8, 32, 5, 5, 5]
    _compare(ours, theirs, atol=1e-3)


def test_seeded_sampling_n_64(vllm_mod, tmp_path):
    path = _save_tiny(tmp_path)
    jobs = [([_prompts(300, 21)], _seeded(64, 5, tokens=16))]
    _compare(_run_engine(path, "CUSTOM", jobs), _run_engine(path, None, jobs), atol=1e-3)


def _record_impls(monkeypatch) -> list[tuple]:
    """(window, softcap, has sinks, query heads, KV heads) of every MultiverseAttentionImpl built."""
    from multiverse_kernels.integrations import vllm as mv

    seen: list[tuple] = []
    orig = mv.MultiverseAttentionImpl.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        seen.append((self.window, self.softcap, self.sinks is not None, self.num_heads, self.num_kv_heads))

    monkeypatch.setattr(mv.MultiverseAttentionImpl, "__init__", init)
    return seen


# Gemma 2 and GPT-OSS: a sliding window of 48 tokens on every other layer (prompts of 100+ tokens, blocks
# of 32: vLLM's sliding-window KV group drops the blocks that leave the window), Gemma 2's logit soft-cap
# (1.0 with query_pre_attn_scalar 2 so that the cap bends the scores: with Gemma's defaults and random
# weights it changes log-probs by ~1e-4, under the tolerance), GPT-OSS's sinks (random, N(0, 1)). GPT-OSS
# unties its embeddings: vLLM 0.32's GptOss loader does not tie lm_head (tied, it stays uninitialised and
# both backends emit garbage).
VARIANT_MODELS = {
    "gemma2": dict(head_dim=32, sliding_window=48, attn_logit_softcapping=1.0, query_pre_attn_scalar=2,
                   final_logit_softcapping=30.0, initializer_range=0.05),
    "gpt_oss": dict(head_dim=32, tie_word_embeddings=False, sliding_window=48, num_local_experts=4,
                    num_experts_per_tok=2, intermediate_size=128, initializer_range=0.05,
                    layer_types=["sliding_attention", "full_attention"]),
}
VARIANTS_EXPECTED = {"gemma2": {(48, 1.0, False, 4, 2), (None, 1.0, False, 4, 2)},
                     "gpt_oss": {(48, None, True, 4, 2), (None, None, True, 4, 2)}}


@pytest.mark.parametrize("arch", sorted(VARIANT_MODELS))
def test_variant_models_match_cpu_attn(vllm_mod, tmp_path, monkeypatch, arch):
    """Tiny Gemma 2 (soft-cap + alternating sliding window) and GPT-OSS (sinks + alternating sliding
    window, MoE on vLLM's CPU unquantized experts) built from configs: greedy and seeded generations on a
    shared prompt identical to CPU_ATTN's, every layer's variant handed to our impl."""
    from vllm import SamplingParams

    path = _save_tiny(tmp_path, arch, **VARIANT_MODELS[arch])
    system = _prompts(100, 30)
    greedy = SamplingParams(temperature=0, max_tokens=10, logprobs=1, detokenize=False)
    jobs = [([system] * 3 + [system + [1, 2, 3], _prompts(130, 31)], greedy),
            ([system + [5]], _seeded(4, 13, tokens=12))]
    theirs = _run_engine(path, None, jobs)
    seen = _record_impls(monkeypatch)
    ours = _run_engine(path, "CUSTOM", jobs)
    assert set(seen) == VARIANTS_EXPECTED[arch], seen
    _compare(ours, theirs, atol=1e-3)


@pytest.mark.parametrize("arch", ["qwen2", "gpt_oss"])
def test_fixed_buffers_match_cpu_attn(vllm_mod, tmp_path, monkeypatch, arch):
    """The CUDA-graph path's metadata, forced on CPU (MULTIVERSE_VLLM_FIXED_BUFFERS=64): every step of at
    most 64 tokens is built into FixedStepBuffers (forest and one padded plan per layer configuration,
    made by the builder; GPT-OSS: sinks, windowed and full layers) and run from those buffers; longer
    steps (the prefills) take the usual path. The same tokens and log-probs as CPU_ATTN, with sharing."""
    from vllm import SamplingParams

    from multiverse_kernels.integrations import vllm as mv

    path = _save_tiny(tmp_path, arch, **VARIANT_MODELS.get(arch, {}))
    system = _prompts(100, 40)
    greedy = SamplingParams(temperature=0, max_tokens=8, logprobs=1, detokenize=False)
    jobs = [([system] * 3 + [system + [1, 2, 3], _prompts(70, 41)], greedy), ([system + [5]], _seeded(8, 17))]
    theirs = _run_engine(path, None, jobs)
    monkeypatch.setenv("MULTIVERSE_VLLM_FIXED_BUFFERS", "64")
    before = dict(mv.STATS)
    ours = _run_engine(path, "CUSTOM", jobs)
    stats = {k: mv.STATS[k] - before[k] for k in before}
    assert stats["fixed_steps"] > 0 and stats["shared_nodes"] > 0, stats
    assert stats["fixed_steps"] < stats["steps"], stats  # the prefills took the usual path
    _compare(ours, theirs, atol=1e-3)


def test_fixed_buffers_env_is_checked(vllm_mod, monkeypatch):
    from multiverse_kernels.integrations import vllm as mv

    monkeypatch.setenv("MULTIVERSE_VLLM_FIXED_BUFFERS", "yes")
    with pytest.raises(ValueError, match="MULTIVERSE_VLLM_FIXED_BUFFERS: expected a token count"):
        mv._fixed_tokens(None, "cpu")
    # on CUDA with full graphs the variable raises the buffers' size, never lowers it below the largest
    # capture size (a captured step outside them would plan inside the graph)
    from types import SimpleNamespace

    cfg = SimpleNamespace(compilation_config=SimpleNamespace(
        cudagraph_mode=SimpleNamespace(has_full_cudagraphs=lambda: True), max_cudagraph_capture_size=512))
    for forced, want in (("", 512), ("0", 512), ("64", 512), ("1024", 1024)):
        monkeypatch.setenv("MULTIVERSE_VLLM_FIXED_BUFFERS", forced)
        assert mv._fixed_tokens(cfg, "cuda") == want
        assert mv._fixed_tokens(cfg, "cpu") == int(forced or 0)


def test_preemption_and_recompute(vllm_mod, tmp_path, monkeypatch):
    """A KV cache of 16 blocks of 32 tokens for requests that need ~24: vLLM preempts running requests
    (frees their blocks) and recomputes them later (prefix-cache hits on what survived); greedy requests on
    a shared system prompt and seeded n = 6 samples, the same tokens as CPU_ATTN under the same
    preemptions."""
    from vllm import SamplingParams
    from vllm.v1.core.sched import scheduler

    preempted = [0]
    orig = scheduler.Scheduler._preempt_request

    def count(self, *a, **k):
        preempted[0] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(scheduler.Scheduler, "_preempt_request", count)
    path = _save_tiny(tmp_path)
    system = _prompts(70, 40)
    greedy = SamplingParams(temperature=0, max_tokens=64, logprobs=1, detokenize=False, ignore_eos=True)
    jobs = [([system + _prompts(5 + i, 41 + i) for i in range(4)] + [_prompts(50, 50), _prompts(50, 51)],
             greedy),
            ([system], _seeded(6, 3, tokens=64, ignore_eos=True))]
    kw = dict(num_gpu_blocks_override=16, max_model_len=256, max_num_seqs=16)
    theirs = _run_engine(path, None, jobs, **kw)
    theirs_preempted, preempted[0] = preempted[0], 0
    ours = _run_engine(path, "CUSTOM", jobs, **kw)
    assert theirs_preempted > 0 and preempted[0] > 0, (theirs_preempted, preempted[0])
    _compare(ours, theirs, atol=1e-3)


_TP_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM spawns its engine and workers: the script is re-imported there
    backend = sys.argv[2] or None
    llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=512,
              block_size=32, seed=0, tensor_parallel_size=2, distributed_executor_backend="mp",
              **({"attention_backend": backend} if backend else {}))
    prompts = json.loads(sys.argv[3])
    jobs = [SamplingParams(temperature=0, max_tokens=8, logprobs=1, detokenize=False),
            SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8, logprobs=1, detokenize=False)]
    out = []
    for sp in jobs:
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        out.append([[(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
                     for c in r.outputs] for r in res])
    print("RESULT", json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_tensor_parallel_2_on_cpu(vllm_mod, tmp_path):
    """Tensor parallel 2 on CPU (gloo, vLLM's "mp" executor: two worker processes, one CPU each via
    VLLM_CPU_OMP_THREADS_BIND: vLLM's automatic binding wants one NUMA node per rank). The 4 query / 2 KV
    heads are split across the ranks (2 / 1 each); the same tokens as CPU_ATTN under the same split."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallel 2 binds one CPU per rank: this process may use only one CPU")
    path = _save_tiny(tmp_path)
    system = _prompts(100, 60)
    prompts = [system, system, system + [1, 2, 3]]
    script = tmp_path / "tp.py"
    script.write_text(_TP_SCRIPT)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND=f"{cpus[0]}|{cpus[1]}")
    runs = {}
    for backend in ("", "CUSTOM"):
        r = subprocess.run([sys.executable, str(script), path, backend, json.dumps(prompts)],
                           capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        assert line, r.stdout[-2000:] + r.stderr[-2000:]
        runs[backend] = (json.loads(line[-1][len("RESULT "):]), r.stdout + r.stderr)
    log = runs["CUSTOM"][1]
    for rank in (0, 1):  # both ranks run our backend, each on half of the heads
        assert any(f"Worker_TP{rank}" in x and "Using AttentionBackendEnum.CUSTOM backend" in x
                   for x in log.splitlines()), log[-3000:]
        assert any(f"Worker_TP{rank}" in x and "2 query / 1 KV heads" in x for x in log.splitlines()), \
            log[-3000:]
    _compare(runs["CUSTOM"][0], runs[""][0], atol=1e-3)


@pytest.mark.slow
def test_bf16_completes_and_agrees(vllm_mod, tmp_path):
    from vllm import SamplingParams

    path = _save_tiny(tmp_path, "qwen2", dtype=torch.bfloat16)
    sp = SamplingParams(temperature=0, max_tokens=6, logprobs=1, detokenize=False)
    system = _prompts(90, 5)
    jobs = [([system] * 4 + [system + [1, 2]], sp)]
    theirs = _run_engine(path, None, jobs, dtype="bfloat16")
    ours = _run_engine(path, "CUSTOM", jobs, dtype="bfloat16")
    # first tokens agree and their log-probs within bf16 tolerance (later tokens may diverge on near ties)
    for ra, rb in zip(ours[0], theirs[0]):
        assert len(ra[0][0]) == 6
        assert ra[0][0][0] == rb[0][0][0]
        assert abs(ra[0][1][0] - rb[0][1][0]) < 5e-2


@pytest.mark.slow
def test_plugin_in_a_spawned_engine(vllm_mod, tmp_path):
    """No user code: a fresh interpreter, vLLM's engine core in its own process, CUSTOM asked for."""
    path = _save_tiny(tmp_path)
    code = textwrap.dedent(f"""
        from vllm import LLM, SamplingParams
        llm = LLM({path!r}, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=256,
                  block_size=32, attention_backend="CUSTOM")
        out = llm.generate([{{"prompt_token_ids": list(range(50))}}] * 2,
                           SamplingParams(temperature=0, max_tokens=4, detokenize=False), use_tqdm=False)
        print("TOKENS", [list(o.outputs[0].token_ids) for o in out])
    """)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_KVCACHE_SPACE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TOKENS" in r.stdout
    assert "Using AttentionBackendEnum.CUSTOM backend" in r.stderr + r.stdout


def test_impl_refuses_what_it_does_not_implement():
    """A keyword vLLM passes the attention impl is implemented or refused, never dropped."""
    pytest.importorskip("vllm", reason="vLLM is not installed (CI's third environment has it)")
    from multiverse_kernels.integrations.vllm import MultiverseAttentionImpl

    base = dict(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")
    MultiverseAttentionImpl(**base, some_future_option=None)  # an unset option is fine
    with pytest.raises(NotImplementedError, match="some_future_option"):
        MultiverseAttentionImpl(**base, some_future_option=3)
    with pytest.raises(NotImplementedError, match="kv_sharing_target_layer_name"):
        MultiverseAttentionImpl(**base, kv_sharing_target_layer_name="model.layers.0.self_attn")


def test_layout_preference_head_major_on_cpu():
    """On CPU the backend asks vLLM for head-major blocks (LBHNC) first, token-major (LBNHC) second."""
    pytest.importorskip("vllm", reason="vLLM is not installed (CI's third environment has it)")
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from multiverse_kernels.integrations.vllm import MultiverseAttentionBackend

    if not current_platform.is_cpu():
        pytest.skip(f"this vLLM build's platform is {current_platform.device_type}, not cpu")
    want = (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)
    assert MultiverseAttentionBackend.supported_kv_cache_layouts() == want


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_update_every_layout(layout, dtype):
    """do_kv_cache_update (on CPU one C++ append_kv_slots call) writes each slot's K and V (padding slots
    -1 skipped) into the per-layer cache of each layout (logical [blocks, Hk, block_size, 2D]): LBNHC,
    LBHNC and any other strides (a padded page); every other element is left untouched; int64 and int32
    slot mappings."""
    pytest.importorskip("vllm", reason="vLLM is not installed (CI's third environment has it)")
    from multiverse_kernels.integrations.vllm import MultiverseAttentionImpl

    nb, hk, bs, d = 5, 3, 4, 8
    impl = MultiverseAttentionImpl(num_heads=6, head_size=d, scale=d ** -0.5, num_kv_heads=hk,
                                   alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    if layout == "LBNHC":
        kv = torch.full((nb, bs, hk, 2 * d), -7.0, dtype=dtype).transpose(1, 2)
    elif layout == "LBHNC":
        kv = torch.full((nb, hk, bs, 2 * d), -7.0, dtype=dtype)
    else:  # blocks padded apart: neither view contiguous
        kv = torch.full((nb, hk * bs * 2 * d + 16), -7.0, dtype=dtype)[:, : hk * bs * 2 * d]
        kv = kv.view(nb, bs, hk, 2 * d).transpose(1, 2)
    assert kv.shape == (nb, hk, bs, 2 * d) and kv.is_contiguous() == (layout == "LBHNC")
    g = torch.Generator().manual_seed(0)
    slots = torch.tensor([7, 0, -1, 19, 12, 3, -1, 8])
    key = torch.randn(len(slots), hk, d, generator=g).to(dtype)
    value = torch.randn(len(slots), hk, d, generator=g).to(dtype)
    want = kv.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want[s // bs, :, s % bs, :d] = key[i]
            want[s // bs, :, s % bs, d:] = value[i]
    impl.do_kv_cache_update(None, key, value, kv, slots)
    assert torch.equal(kv, want)
    kv.fill_(-7.0)
    impl.do_kv_cache_update(None, key, value, kv, slots.int())
    assert torch.equal(kv, want)


@pytest.mark.parametrize("head_major", [True, False])
def test_both_cache_layouts_match_cpu_attn(vllm_mod, tmp_path, monkeypatch, head_major):
    """The CPU default (head-major blocks, LBHNC) and token-major blocks (LBNHC, the backend's second
    choice; forced here by declaring it alone, since vLLM reads VLLM_KV_CACHE_LAYOUT once per process):
    the same tokens and log-probs as CPU_ATTN (which reads head-major blocks only); the layout each
    engine got is checked on the caches the backend writes, and every step's C++ plan is made by the
    metadata builder (none inside a layer's forward)."""
    from vllm import SamplingParams
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from multiverse_kernels.integrations import vllm as mv

    path = _save_tiny(tmp_path)
    system = _prompts(90, 8)
    jobs = [([system] * 3 + [system + [4, 5]], SamplingParams(temperature=0, max_tokens=5, logprobs=1,
                                                               detokenize=False))]
    theirs = _run_engine(path, None, jobs)
    if not head_major:
        monkeypatch.setattr(mv.MultiverseAttentionBackend, "supported_kv_cache_layouts",
                            classmethod(lambda cls: (KVCacheLayout.LBNHC,)))
    seen = set()
    orig = mv.MultiverseAttentionImpl.do_kv_cache_update

    def update(self, layer, key, value, kv_cache, slot_mapping):
        seen.add(kv_cache.is_contiguous())  # logical [blocks, Hk, block_size, 2D]: contiguous iff LBHNC
        return orig(self, layer, key, value, kv_cache, slot_mapping)

    monkeypatch.setattr(mv.MultiverseAttentionImpl, "do_kv_cache_update", update)
    callers = []
    orig_args = mv._cpu_run_args

    def run_args(forest, key):
        callers.append(sys._getframe(1).f_code.co_name)
        return orig_args(forest, key)

    monkeypatch.setattr(mv, "_cpu_run_args", run_args)
    _compare(_run_engine(path, "CUSTOM", jobs), theirs, atol=1e-3)
    assert seen == {head_major}
    assert callers and set(callers) == {"build"}  # every step planned by the builder, none in a forward
