"""Model families whose attention needs the variants (docs/design.md "Attention variants"): tiny random
Llama, Qwen3, Mistral, Gemma 2, Gemma 3 and GPT-OSS (configs only, nothing downloaded) through the packed
Multiverse path (``packed_forward``) equal the same model with eager attention on the dense Multiverse
mask, with the sliding window applied by position on the sliding layers (transformers' rule: a key is
visible iff ``q_pos - k_pos < window``), the soft-cap (Gemma 2) and the sinks (GPT-OSS) computed by
transformers itself; on a single plain branch they equal the ordinary model (its own masks). Gradients
of the sink logits and the weights follow. A keyword the integration does not implement raises."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from multiverse_kernels.integrations.transformers import (  # noqa: E402
    attention_variant,
    packed_forward,
)
from multiverse_kernels.multiverse import MultiverseTags, parse  # noqa: E402
from multiverse_kernels.multiverse.synthetic import random_sequence  # noqa: E402

V = 64
TAGS = MultiverseTags(*range(V, V + 10))
W = 6  # a window shorter than the sequences, so it matters


def _config(family: str):
    common = dict(vocab_size=V + 10, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, head_dim=16)
    if family == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if family == "qwen3":
        return (transformers.Qwen3Config(**common, use_sliding_window=True, sliding_window=W,
                                         layer_types=["sliding_attention", "full_attention"]),
                transformers.Qwen3ForCausalLM)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=W), transformers.MistralForCausalLM
    if family == "gemma2":
        return (transformers.Gemma2Config(**common, sliding_window=W, attn_logit_softcapping=3.0,
                                          final_logit_softcapping=None, query_pre_attn_scalar=16,
                                          layer_types=["sliding_attention", "full_attention"]),
                transformers.Gemma2ForCausalLM)
    if family == "gemma3":
        return (transformers.Gemma3TextConfig(**common, sliding_window=W, query_pre_attn_scalar=16,
                                              layer_types=["sliding_attention", "full_attention"]),
                transformers.Gemma3ForCausalLM)
    if family == "gpt_oss":
        cfg = dict(common, intermediate_size=32)
        return (transformers.GptOssConfig(**cfg, sliding_window=W, num_local_experts=2, num_experts_per_tok=1,
                                          layer_types=["sliding_attention", "full_attention"]),
                transformers.GptOssForCausalLM)
    raise ValueError(family)


FAMILIES = ["llama", "qwen3", "mistral", "gemma2", "gemma3", "gpt_oss"]
# float64 models (GPT-OSS: float32, its MoE GEMMs take no float64); transformers' eager attention runs the
# softmax in float32 whatever the model's dtype
DTYPE = {f: torch.float32 if f == "gpt_oss" else torch.float64 for f in FAMILIES}
TOL = {f: dict(atol=2e-4, rtol=2e-4) if f == "gpt_oss" else dict(atol=2e-5, rtol=2e-5) for f in FAMILIES}


def tiny(family: str, seed: int = 0):
    cfg, cls = _config(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).to(DTYPE[family]).eval()
    with torch.no_grad():  # larger weights than the default init, so every context matters
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            elif name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return model, ref


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)[None, None]


def dense_recipe(ref, s):
    """Eager attention on the dense Multiverse mask; sliding layers also drop keys >= W positions back."""
    full = s.dense_mask()
    pos = s.position_ids
    sliding = full & ((pos[:, None] - pos[None, :]) < W)
    types = set(getattr(ref.config, "layer_types", None) or [])
    dt = ref.dtype
    if ref.config.model_type == "mistral":
        mask = _additive(sliding, dt)
    elif types:
        mask = {"full_attention": _additive(full, dt), "sliding_attention": _additive(sliding, dt)}
    else:
        mask = _additive(full, dt)
    return ref(input_ids=s.token_ids[None], position_ids=pos[None], attention_mask=mask,
               use_cache=False).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_dense_recipe(family):
    model, ref = tiny(family, seed=1)
    s = parse(random_sequence(2, TAGS, vocab=V, max_depth=2, max_paths=3), TAGS)
    assert s.num_tokens > 2 * W
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "running the reference" (tested in test_variants)
        got = packed_forward(model, s)
        want = dense_recipe(ref, s)
    torch.testing.assert_close(got, want, **TOL[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_single_branch_equals_the_plain_model(family):
    """No tags: one chain; transformers' own masks (window by sequence index = position) decide."""
    model, ref = tiny(family, seed=2)
    ids = torch.randint(0, V, (3 * W,), generator=torch.Generator().manual_seed(0))
    s = parse(ids.tolist(), TAGS)
    with torch.no_grad():
        got = packed_forward(model, s, backend="reference")
        want = ref(input_ids=ids[None], use_cache=False).logits[0]
    torch.testing.assert_close(got, want, **TOL[family])


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_gradients_equal_dense_recipe(family):
    model, ref = tiny(family, seed=3)
    s = parse(random_sequence(4, TAGS, vocab=V, max_depth=1, max_paths=2), TAGS)
    target = torch.roll(s.token_ids, -1)
    for m, f in ((model, lambda: packed_forward(model, s, backend="reference")),
                 (ref, lambda: dense_recipe(ref, s))):
        m.zero_grad()
        torch.nn.functional.cross_entropy(f(), target).backward()
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4 if family == "gpt_oss" else 1e-5, rtol=1e-3,
                                   msg=name)
    if family == "gpt_oss":  # the sink logits are trained through tree_attention's autograd
        sinks = [p for n, p in model.named_parameters() if n.endswith("sinks")]
        assert sinks and all(p.grad is not None and p.grad.abs().sum() > 0 for p in sinks)


def test_unknown_keyword_raises():
    q = torch.zeros(1, 4, 3, 8)
    assert attention_variant({"sliding_window": 4, "softcap": 2.0, "multiverse": object(), "position_ids": 1,
                              "use_cache": False, "cu_seq_lens_q": None}, q) == {"window": 4, "softcap": 2.0}
    with pytest.raises(NotImplementedError, match="cu_seq_lens_q"):
        attention_variant({"cu_seq_lens_q": torch.zeros(2)}, q)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        attention_variant({"output_attentions": True}, q)
    with pytest.raises(NotImplementedError, match="is_causal"):
        attention_variant({"is_causal": False}, q)
    assert attention_variant({"is_causal": True}, q) == {}
    sinks = attention_variant({"s_aux": torch.zeros(4, dtype=torch.bfloat16)}, q)["sinks"]
    assert sinks.dtype == torch.float32
