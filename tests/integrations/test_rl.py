"""Packed RL rollout trees (multiverse_kernels.rl): the packing itself, and with a tiny transformers model
built from a config (random weights, nothing downloaded): per-token log-probs of the packed run equal
those of running every (prompt + completion) alone, and the gradients of a GRPO-style loss equal the sum
of the unpacked runs' gradients (float32)."""

from __future__ import annotations

import copy

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.rl import RolloutNode, group_tree, pack_group, pack_rollouts, rollout_forward

VOCAB = 50


def _rand(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=g)


def multi_turn_tree(g: torch.Generator) -> RolloutNode:
    """prompt -> 2 first turns; turn 0 -> tool reply -> 3 second turns (one of them 1 token);
    turn 1 -> tool reply -> 1 second turn."""
    t0 = RolloutNode(_rand(5, g), [RolloutNode(_rand(3, g), [RolloutNode(_rand(4, g)),
                                                              RolloutNode(_rand(1, g)),
                                                              RolloutNode(_rand(6, g))],
                                               trainable=False)])
    t1 = RolloutNode(_rand(2, g), [RolloutNode(_rand(2, g), [RolloutNode(_rand(3, g))], trainable=False)])
    return RolloutNode(_rand(7, g), [t0, t1], trainable=False)


def test_pack_group_layout():
    g = torch.Generator().manual_seed(0)
    prompt, comps = _rand(6, g), [_rand(n, g) for n in (3, 1, 5)]
    p = pack_group(prompt, comps)
    assert p.num_tokens == 6 + 9 and p.unpacked_tokens() == 3 * 6 + 9
    assert p.leaves == [1, 2, 3]
    for i, c in enumerate(comps):
        seq = p.sequences[i]
        torch.testing.assert_close(p.token_ids[seq], torch.cat([prompt, c]))
        torch.testing.assert_close(p.position_ids[seq], torch.arange(6 + c.numel()))  # positions continue
        assert p.prev_index[seq[0]] == -1 and (p.prev_index[seq[1:]] == seq[:-1]).all()
        assert (p.trainable[seq] == (torch.arange(seq.numel()) >= 6)).all()
        torch.testing.assert_close(p.per_sequence(p.token_ids, trainable_only=True)[i], c)
    meta = p.metadata()
    meta.validate(num_pages=p.num_tokens)
    assert meta.vis_nodes.tolist() == [0, 0, 1, 0, 2, 0, 3]


def test_multi_turn_layout_and_errors():
    g = torch.Generator().manual_seed(1)
    tree = multi_turn_tree(g)
    p = pack_rollouts(tree)
    assert len(p.sequences) == 4 and p.num_nodes == 9
    lengths = [s.numel() for s in p.sequences]
    assert lengths == [7 + 5 + 3 + 4, 7 + 5 + 3 + 1, 7 + 5 + 3 + 6, 7 + 2 + 2 + 3]
    for s in p.sequences:
        torch.testing.assert_close(p.position_ids[s], torch.arange(s.numel()))
    # tool replies are not trainable: trajectory 0 trains on turn 0 (5) and its second turn (4)
    assert int(p.trainable[p.sequences[0]].sum()) == 9
    with pytest.raises(ValueError, match=r"tree.children\[1\].tokens"):
        pack_rollouts(group_tree([1, 2], [[3], []]))
    with pytest.raises(ValueError, match="logits: expected"):
        p.token_logprobs(torch.zeros(3, VOCAB))


@pytest.mark.parametrize("tree_kind", ["group", "multi_turn"])
def test_attention_equals_each_sequence_alone(tree_kind):
    """tree_attention over the packed forest = causal attention of every trajectory alone (float64)."""
    g = torch.Generator().manual_seed(2)
    tree = (group_tree(_rand(9, g), [_rand(n, g) for n in (4, 1, 7, 2)]) if tree_kind == "group"
            else multi_turn_tree(g))
    p = pack_rollouts(tree)
    L = p.num_tokens
    q = torch.randn(L, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(L, 1, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(L, 1, 2, 8, generator=g, dtype=torch.float64)
    out = mk.tree_attention(q, k, v, p.metadata(), backend="reference")
    for s in p.sequences:
        qs, ks, vs = q[s].transpose(0, 1), k[s, 0].transpose(0, 1), v[s, 0].transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(
            qs, ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0), is_causal=True)
        torch.testing.assert_close(out[s], ref.transpose(0, 1), atol=1e-12, rtol=1e-12)


transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def tiny_model(seed: int = 0, head_dim: int = 16):
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=4 * head_dim, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # larger weights than the default init: logits depend clearly on context
        for prm in model.parameters():
            prm.mul_(4.0 if prm.dim() > 1 else 1.0)
    alone = copy.deepcopy(model)
    alone.set_attn_implementation("sdpa")
    return model, alone


def unpacked_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """[len - 1]: log p(ids[j] | ids[:j]) for j >= 1, running the sequence alone."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0]
    return torch.log_softmax(logits[:-1].float(), -1).gather(1, ids[1:, None])[:, 0]


def grpo_loss(logprobs: list[torch.Tensor], adv: torch.Tensor) -> torch.Tensor:
    """A GRPO-style policy-gradient loss: -sum_i A_i * mean_t logp_{i,t} (ratio 1, no clipping/KL)."""
    return -sum(a * lp.mean() for a, lp in zip(adv, logprobs, strict=True))


def _trees():
    g = torch.Generator().manual_seed(3)
    yield "group", group_tree(_rand(12, g), [_rand(n, g) for n in (5, 1, 8, 3)])
    yield "multi_turn", multi_turn_tree(g)


@pytest.mark.parametrize("kind,tree", list(_trees()))
def test_logprobs_and_grpo_gradients_match_unpacked(kind, tree):
    model, alone = tiny_model()
    p = pack_rollouts(tree)
    lp_packed = p.token_logprobs(rollout_forward(model, p))
    per_traj = p.per_sequence(lp_packed)
    adv = torch.linspace(-1.0, 1.5, len(p.sequences))
    unpacked = []
    for s, lp in zip(p.sequences, per_traj, strict=True):
        ref = unpacked_logprobs(alone, p.token_ids[s])
        torch.testing.assert_close(lp[1:], ref, atol=2e-5, rtol=2e-5)
        unpacked.append(ref)
    # the loss over trainable tokens (completions), packed vs the sum of unpacked runs
    masks = [p.trainable[s][1:] for s in p.sequences]
    packed_loss = grpo_loss(p.per_sequence(lp_packed, trainable_only=True), adv)
    packed_loss.backward()
    for i, (s, m) in enumerate(zip(p.sequences, masks, strict=True)):
        grpo_loss([unpacked_logprobs(alone, p.token_ids[s])[m]], adv[i:i + 1]).backward()
    torch.testing.assert_close(packed_loss.detach(), grpo_loss([u[m] for u, m in zip(unpacked, masks,
                                                                                     strict=True)], adv),
                               atol=1e-5, rtol=1e-5)
    n = 0
    for (name, a), b in zip(model.named_parameters(), alone.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, atol=5e-5, rtol=1e-4, msg=lambda m, nm=name: f"{nm}: {m}")
        n += 1
    assert n > 10


def _example(*args: str):
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(root / "examples" / "rl_packing.py"), *args],
                          capture_output=True, text=True, cwd=root, timeout=600, env=env)


def test_example_check_runs():
    """examples/rl_packing.py --check: packed log-probs and gradients equal the unpacked batch's."""
    out = _example("--check")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK: packed log-probs and gradients equal" in out.stdout


@pytest.mark.slow
def test_example_measurement_runs():
    """A tiny measurement run of examples/rl_packing.py prints its table (fresh processes)."""
    import re

    out = _example("--prompt", "32", "--completion", "8", "--groups", "2", "--hidden", "64", "--layers", "1",
                   "--vocab", "64", "--repeats", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^\s+2 unpacked\s+80\s+\d+", out.stdout, re.M), out.stdout
    assert re.search(r"^\s+2 packed\s+48\s+\d+", out.stdout, re.M), out.stdout
    assert "packed/unpacked:" in out.stdout
