"""TRL integration (multiverse_kernels.integrations.trl): TRL's own tree packer (``TreeRow.pack()``) through
the drop-in "tree_fa3" attention equals running every sample alone through the plain model (per-token
log-probs and parameter gradients; Qwen2, Llama, Gemma 2 with sliding window + soft-cap; fp32 and bf16),
``AsyncGRPOTrainer.compute_loss`` on a packed micro-batch equals the unpacked loss, the stock
``GRPOTrainer`` and :class:`MultiverseGRPOTrainer` give the same loss and gradients on one batch (and the
latter trains end to end, slow), bad tree keywords raise naming them, and a 2-rank gloo run of the drop-in
with a process group equals the single process (Qwen2, and Gemma 2 with sliding window + soft-cap). Tiny
random models from configs, nothing downloaded."""

from __future__ import annotations

import copy
import os
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from _ranks import process_group, spawn_ranks

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("trl", reason="trl is not installed")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.async_grpo import packing  # noqa: E402
from trl.experimental.async_grpo.packing import TreeRow  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from multiverse_kernels.integrations import trl as mk_trl  # noqa: E402

V = 48
W = 5  # Gemma 2's sliding window: shorter than the samples, so it matters


# ------------------------------------------------------------------------------------------ models
def _config(family: str):
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=16)
    if family == "qwen2":
        return transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    if family == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if family == "gemma2":
        return (transformers.Gemma2Config(**common, sliding_window=W, attn_logit_softcapping=3.0,
                                          final_logit_softcapping=None, query_pre_attn_scalar=16,
                                          layer_types=["sliding_attention", "full_attention"]),
                transformers.Gemma2ForCausalLM)
    raise ValueError(family)


def tiny(family: str, dtype=torch.float32, seed: int = 0, scale: float = 4.0):
    """(packed model switched to "tree_fa3", the same weights on eager attention for the samples alone)."""
    cfg, cls = _config(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype)
    with torch.no_grad():  # larger weights than the default init: every context matters
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    alone = copy.deepcopy(model)
    model.set_attn_implementation(mk_trl.register())
    return model, alone


# ------------------------------------------------------------------------------------------ samples
def _rand(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=g)


def _sample(prompt: torch.Tensor, parts: list[tuple[torch.Tensor, bool]], group: int, adv: float) -> dict:
    """A sample: the prompt (not trained) then parts (tokens, trained?): completions and tool replies."""
    ids = torch.cat([prompt] + [t for t, _ in parts])
    mask = torch.cat([torch.zeros(len(prompt), dtype=torch.long)]
                     + [torch.full((len(t),), int(tr), dtype=torch.long) for t, tr in parts])
    g = torch.Generator().manual_seed(int(ids.sum()))
    return dict(input_ids=ids, completion_mask=mask, old_log_probs=-torch.rand(len(ids), generator=g) * 3,
                advantage=adv, group_id=group, metrics={})


def samples(kind: str, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    if kind == "group":  # one prompt, G completions (one of them a single token)
        p = _rand(11, g)
        return [_sample(p, [(_rand(n, g), True)], 0, a) for n, a in zip((6, 1, 9, 4), (1.0, -0.5, 0.3, -1.2))]
    if kind == "multi_turn":  # turn 1, a tool reply, then the rollout forks again (and one stops early)
        p, t1, tool = _rand(7, g), _rand(5, g), _rand(3, g)
        out = [_sample(p, [(t1, True), (tool, False), (_rand(n, g), True)], 0, a)
               for n, a in ((4, 0.7), (6, -0.4), (2, 1.1))]
        return out + [_sample(p, [(_rand(8, g), True)], 0, -0.9), _sample(p, [(t1, True)], 0, 0.2)]
    if kind == "prompts":  # several prompts per row, sharing a system prefix
        sys_, out = _rand(4, g), []
        for grp in range(3):
            p = torch.cat([sys_, _rand(3 + grp, g)])
            out += [_sample(p, [(_rand(n, g), True)], grp, 0.5 - grp + 0.25 * n) for n in (3, 5)]
        return out
    raise ValueError(kind)


def pack(smp: list[dict]) -> dict:
    row = TreeRow()
    for s in smp:
        row.add(s)
    return row.pack()


def tree_kwargs(pk: dict) -> dict:
    mq, mk = pk["tree_max_seqlens"].tolist()
    return dict(tree_kv_index=pk["tree_kv_index"], tree_cu_seqlens_q=pk["tree_cu_seqlens_q"],
                tree_cu_seqlens_k=pk["tree_cu_seqlens_k"], tree_max_seqlen_q=mq, tree_max_seqlen_k=mk)


def packed_targets(model, pk: dict) -> torch.Tensor:
    """log-prob of every loss target of the row (TRL's token_index order), one packed forward."""
    logits = model(input_ids=pk["input_ids"][None], position_ids=pk["position_ids"][None], use_cache=False,
                   **tree_kwargs(pk)).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    rows = pk["token_index"]
    labels = pk["shift_labels"][rows]
    return lp[rows].gather(1, labels[:, None])[:, 0]


def alone_targets(model, smp: list[dict]) -> torch.Tensor:
    """The same targets (TRL's order: sample by sample, trained tokens in order), every sample alone."""
    out = []
    for s in smp:
        ids, m = s["input_ids"], s["completion_mask"].bool()
        lp = torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0].float(), -1)
        p = torch.nonzero(m[1:])[:, 0] + 1
        out.append(lp[p - 1].gather(1, ids[p][:, None])[:, 0])
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ metadata
@pytest.mark.parametrize("kind", ["group", "multi_turn", "prompts"])
def test_metadata_is_the_trie_and_attention_equals_the_gather(kind):
    pk = pack(samples(kind))
    T = pk["input_ids"].numel()
    meta = mk_trl.tree_metadata(pk["tree_kv_index"], pk["tree_cu_seqlens_q"], pk["tree_cu_seqlens_k"], T)
    # node s is segment s; its visibility list expands to exactly TRL's gathered path
    cq = pk["tree_cu_seqlens_q"].tolist()
    path = torch.cat([torch.cat([torch.arange(cq[n], cq[n + 1]) for n in
                                 meta.vis_nodes[meta.vis_indptr[s]:meta.vis_indptr[s + 1]].tolist()])
                      for s in range(meta.num_groups)])
    assert torch.equal(path, pk["tree_kv_index"])
    assert torch.equal(meta.node_pos.long(), pk["position_ids"][pk["tree_cu_seqlens_q"][:-1].long()])
    assert mk_trl.gathered_kv_rows(pk["tree_cu_seqlens_k"]) > T  # TRL copies shared tokens, we do not
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    want = mk_trl.gather_tree_attention(q, k, v, pk["tree_kv_index"], pk["tree_cu_seqlens_q"],
                                        pk["tree_cu_seqlens_k"])
    got = mk_trl.tree_attention_forward(torch.nn.Module(), q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                        v.transpose(0, 1)[None], None, **tree_kwargs(pk))[0][0]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    got_w = mk_trl.tree_attention_forward(torch.nn.Module(), q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          v.transpose(0, 1)[None], None, sliding_window=3, softcap=2.0,
                                          **tree_kwargs(pk))[0][0]
    want_w = mk_trl.gather_tree_attention(q, k, v, pk["tree_kv_index"], pk["tree_cu_seqlens_q"],
                                          pk["tree_cu_seqlens_k"], sliding_window=3, softcap=2.0)
    torch.testing.assert_close(got_w, want_w, atol=1e-10, rtol=1e-10)


def test_metadata_cached_across_layers():
    pk = pack(samples("group"))
    model, _ = tiny("qwen2")
    calls = []
    orig = mk_trl.tree_metadata
    mk_trl.tree_metadata = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        packed_targets(model, pk)
        assert len(calls) == 1  # two layers, one build
        pk2 = {k: v.clone() for k, v in pk.items()}
        packed_targets(model, pk2)
        assert len(calls) == 2  # new tensors: rebuilt
    finally:
        mk_trl.tree_metadata = orig


# ------------------------------------------------------------------------------ exactness on models
def _check_model(family: str, kinds: list[str], dtype=torch.float32, lp_tol=1e-5, grad_tol=(5e-5, 1e-4),
                 scale=4.0):
    model, alone = tiny(family, dtype, scale=scale)
    for kind in kinds:
        smp = samples(kind)
        pk = pack(smp)
        got = packed_targets(model, pk)
        want = alone_targets(alone, smp)
        torch.testing.assert_close(got, want, atol=lp_tol, rtol=lp_tol)
        adv = pk["advantages"]
        model.zero_grad()
        alone.zero_grad()
        (got * adv).sum().backward()
        (want * adv).sum().backward()
        for (name, a), b in zip(model.named_parameters(), alone.parameters(), strict=True):
            assert a.grad is not None and b.grad is not None, name
            torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=grad_tol[0], rtol=grad_tol[1],
                                       msg=lambda m, nm=name, kd=kind: f"{family}/{kd} {nm}: {m}")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_logprobs_and_gradients_equal_samples_alone(family):
    _check_model(family, ["group", "multi_turn", "prompts"])


def test_gemma2_sliding_window_and_softcap_equal_samples_alone():
    with warnings.catch_warnings():  # variants may run on the reference backend (a warning) until C++ lands
        warnings.simplefilter("ignore")
        _check_model("gemma2", ["group", "multi_turn"])


def test_bf16_equals_samples_alone():
    _check_model("qwen2", ["group", "prompts"], torch.bfloat16, lp_tol=3e-2, grad_tol=(3e-2, 5e-2), scale=1.0)


# ----------------------------------------------------------------------------------- AsyncGRPOTrainer
def _stub_trainer():
    acc = SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x)
    stub = SimpleNamespace(epsilon_low=0.2, epsilon_high=0.28, aux_loss_enabled=False,
                           current_gradient_accumulation_steps=1, accelerator=acc,
                           _metrics={"train": defaultdict(list)}, _last_forward_time_s=0.0)
    for k in ("_step_forward_tokens", "_step_trained_tokens", "_step_seq_len_weighted", "_step_samples",
              "_step_forward_s"):
        setattr(stub, k, 0.0)
    return stub


def _grpo_loss(logp, old, adv, eps_lo=0.2, eps_hi=0.28):
    ratio = torch.exp(logp - old)
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi) * adv).sum() / logp.numel()


def test_async_grpo_compute_loss_equals_unpacked():
    from trl.experimental.async_grpo.async_grpo_trainer import AsyncGRPOTrainer, DataCollatorForRollout

    model, alone = tiny("qwen2")
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    smp = samples("multi_turn") + samples("group", seed=1)
    for i, s in enumerate(smp):
        s["group_id"] = i // 5
    row = TreeRow()
    for s in smp:
        row.add(s)
    batch = DataCollatorForRollout(pad_token_id=0).torch_call([[row]])
    loss = AsyncGRPOTrainer.compute_loss(_stub_trainer(), model, batch)
    loss.backward()
    want_lp = alone_targets(alone, smp)
    old = torch.cat([s["old_log_probs"][1:][s["completion_mask"][1:].bool()] for s in smp])
    adv = torch.cat([torch.full((int(s["completion_mask"][1:].sum()),), s["advantage"]) for s in smp])
    want = _grpo_loss(want_lp, old, adv)
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(model.named_parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=5e-5, rtol=1e-4, msg=lambda m, nm=name: f"{nm}: {m}")


def test_trl_reregistration_keeps_ours():
    from transformers import AttentionInterface

    mk_trl.register()
    packing.register_tree_attention()  # what AsyncGRPOTrainer.__init__ calls
    fn = AttentionInterface._global_mapping[mk_trl.TRL_TREE_ATTENTION]
    assert getattr(fn, "func", None) is mk_trl.tree_attention_forward
    mk_trl.unregister()
    assert AttentionInterface._global_mapping[mk_trl.TRL_TREE_ATTENTION] is packing.tree_attention
    mk_trl.register()
    fn = AttentionInterface._global_mapping["tree_fa3"]
    assert getattr(fn, "func", None) is mk_trl.tree_attention_forward


# ------------------------------------------------------------------------------------------ bad input
def _call(pk: dict, T: int | None = None, query_batch: int = 1, **over):
    T = pk["input_ids"].numel() if T is None else T
    q = torch.randn(query_batch, 4, T, 8)
    k = torch.randn(query_batch, 2, T, 8)
    kw = {**tree_kwargs(pk), **over}
    return mk_trl.tree_attention_forward(torch.nn.Module(), q, k, k.clone(), None, **kw)


def test_bad_input_names_the_keyword():
    pk = pack(samples("group"))
    cq, ck, kv = pk["tree_cu_seqlens_q"], pk["tree_cu_seqlens_k"], pk["tree_kv_index"]
    cases = [
        (dict(tree_cu_seqlens_q=cq.flip(0)), "tree_cu_seqlens_q"),
        (dict(tree_cu_seqlens_q=torch.cat([cq[:2], cq[1:2], cq[2:]])), "tree_cu_seqlens"),
        (dict(tree_cu_seqlens_k=ck[:-1]), "tree_cu_seqlens_k"),
        (dict(tree_cu_seqlens_k=torch.cat([ck[:1], ck[2:2], ck[1:-1] + 1, ck[-1:]])), "tree_"),
        (dict(tree_kv_index=kv.clone().index_fill_(0, torch.tensor([3]), 10_000)), "tree_kv_index"),
        (dict(tree_kv_index=kv.clone().index_fill_(0, torch.tensor([0]), -1)), "tree_kv_index"),
        (dict(tree_kv_index=kv.roll(1)), "tree_kv_index"),
        (dict(tree_kv_index=None), "tree_kv_index"),
        (dict(tree_max_seqlen_k=1), "tree_max_seqlen_k"),
        (dict(tree_cu_seqlens_q=cq.float()), "tree_cu_seqlens_q"),
    ]
    for over, name in cases:
        with pytest.raises(ValueError, match=name):
            _call({**pk}, **over)
    with pytest.raises(ValueError, match="tree_cu_seqlens_q"):
        _call(pk, T=pk["input_ids"].numel() + 1)
    with pytest.raises(ValueError, match="batch size 1"):
        _call(pk, query_batch=2)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        _call(pk, alibi_slopes=torch.ones(4))
    with pytest.raises(ValueError, match="attention_mask"):
        mk_trl.tree_attention_forward(torch.nn.Module(), torch.randn(1, 4, 2, 8), torch.randn(1, 2, 2, 8),
                                      torch.randn(1, 2, 2, 8), torch.ones(1, 1, 2, 2), **tree_kwargs(pk))


# ------------------------------------------------------------------------------------------ GRPOTrainer
def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(V - 3)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def _grpo(cls, model, tmp_path, steps: int = 1, **cfg):
    from datasets import Dataset
    from trl import GRPOConfig

    g = torch.Generator().manual_seed(5)
    prompts = [" ".join(f"w{int(t)}" for t in torch.randint(0, V - 3, (int(n),), generator=g))
               for n in torch.randint(3, 9, (8,), generator=g)]
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=steps, learning_rate=1e-3, logging_steps=1,
                      report_to=[], use_cpu=True, save_strategy="no", seed=0, beta=0.04,
                      temperature=1.0, bf16=False, **cfg)

    def reward(completions, **kw):
        return [float(len(c)) / 10.0 for c in completions]

    return cls(model=model, reward_funcs=reward, args=args,
               train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=_tokenizer())


def _grpo_model_dir(tmp_path) -> str:
    """A tiny Qwen2 and its word tokenizer saved to a directory (the trainers load the policy and the
    reference model from it)."""
    cfg, cls = _config("qwen2")
    cfg.pad_token_id, cfg.eos_token_id = 0, 1
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(2.0)
    path = tmp_path / "tiny-qwen2"
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


def test_grpo_trainer_loss_and_gradients_equal_stock(tmp_path):
    from trl import GRPOTrainer

    path = _grpo_model_dir(tmp_path)
    stock = _grpo(GRPOTrainer, path, tmp_path / "a")
    ours = _grpo(mk_trl.MultiverseGRPOTrainer, path, tmp_path / "b")
    # one generation batch from the stock trainer (its sampling), scored by both
    torch.manual_seed(1)
    raw = next(iter(stock.get_train_dataloader()))
    inputs = stock._generate_and_score_completions(raw)
    assert inputs["completion_ids"].shape[0] == 4
    assert len({tuple(r.tolist()) for r in inputs["prompt_ids"]}) == 1  # one group: its prompt is shared
    ref_s, _, _ = stock._get_per_token_logps_and_entropies(
        stock.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])
    ref_o, _, _ = ours._get_per_token_logps_and_entropies(
        ours.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])
    torch.testing.assert_close(ref_o, ref_s, atol=1e-5, rtol=1e-5)
    ls = stock.compute_loss(stock.model, inputs)
    lo = ours.compute_loss(ours.model, inputs)
    ls.backward()
    lo.backward()
    torch.testing.assert_close(lo, ls, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(ours.model.named_parameters(), stock.model.parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=5e-5, rtol=1e-4, msg=lambda m, nm=name: f"{nm}: {m}")
    assert ours.mk_stats["packed_tokens"] < ours.mk_stats["unpacked_tokens"]
    assert ours.model.config._attn_implementation == "sdpa"  # switched back after the packed forward


@pytest.mark.slow
def test_grpo_trainer_trains_end_to_end(tmp_path):
    trainer = _grpo(mk_trl.MultiverseGRPOTrainer, _grpo_model_dir(tmp_path), tmp_path / "out", steps=3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.train()
    assert out.global_step == 3
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert trainer.mk_stats["packed_tokens"] < trainer.mk_stats["unpacked_tokens"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


# ------------------------------------------------------------------------------ context parallel (gloo)
def _cp_worker(rank: int, world: int, init: str) -> None:
    with process_group("gloo", rank, world, init), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a variant may run on the reference (it warns)
        smp = samples("multi_turn") + samples("prompts")
        pk = pack(smp)
        ids, pos = pk["input_ids"][None], pk["position_ids"][None]
        L = pk["input_ids"].numel()
        ranges = [(0, L // 3), (L // 3, L)]
        s, e = ranges[rank]
        # plain (Qwen2) and Gemma 2 (sliding window by the row's positions on layer 0, soft-cap)
        for family in ("qwen2", "gemma2"):
            model, single = tiny(family)
            # the single-process reference: the whole row
            single.set_attn_implementation(mk_trl.register("mk_tree_single"))
            out = single(input_ids=ids, position_ids=pos, **tree_kwargs(pk)).logits[0]
            lp_all = torch.log_softmax(out, -1)
            model.set_attn_implementation(mk_trl.register("mk_tree_cp", group=dist.group.WORLD,
                                                          token_ranges=ranges))
            lp = torch.log_softmax(model(input_ids=ids[:, s:e], position_ids=pos[:, s:e],
                                         **tree_kwargs(pk)).logits[0], -1)
            torch.testing.assert_close(lp, lp_all[s:e], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, f=family: f"{f} log-probs: {m}")
            lab = pk["shift_labels"]
            m_all = lab >= 0
            (lp_all[m_all].gather(1, lab[m_all][:, None])).sum().backward()
            m = lab[s:e] >= 0
            (lp[m].gather(1, lab[s:e][m][:, None])).sum().backward()
            for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
                dist.all_reduce(p.grad)
                torch.testing.assert_close(p.grad, q.grad, atol=5e-5, rtol=1e-4,
                                           msg=lambda m, nm=name, f=family: f"{f} {nm}: {m}")


def test_two_ranks_context_parallel_equals_single_process(tmp_path):
    spawn_ranks(_cp_worker, (2, f"file://{tmp_path}/rendezvous"), 2, timeout=180)
