"""multiverse_generate (one-call Multiverse generation with sampling, stops and a budget) and the scoped
"multiverse" attention switch: a transformers model is usable as before after any Multiverse call."""

import warnings

import pytest
import torch
from _multiverse_script import prompt

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from multiverse_kernels.integrations.generate import multiverse_generate, sample_next  # noqa: E402
from multiverse_kernels.integrations.transformers import (  # noqa: E402
    ATTN_NAME,
    ForestKVCache,
    cache_kwarg,
    forest_forward,
    packed_forward,
    register,
    use_multiverse_attention,
)
from multiverse_kernels.multiverse import MultiverseDriver, MultiverseTags, parse  # noqa: E402

V = 64
TAGS = MultiverseTags(*range(V, V + 10))


def tiny(dtype=torch.float32, seed=0):
    cfg = transformers.Qwen2Config(vocab_size=V + 10, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    model.set_attn_implementation("sdpa")
    return model


def block_prompt(paths=2):
    return prompt(TAGS, 0, V, paths=paths)  # trunk words, <Parallel> <Goal> <Outline>... </Goal>


def one_block():
    return parse(block_prompt() + [TAGS.path_start, 3, TAGS.path_end, TAGS.conclusion_start, 8], TAGS,
                 partial=True)


def test_model_usable_after_multiverse_calls():
    model = tiny()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        before = model(ids).logits
    s = parse(block_prompt() + [TAGS.path_start, 3, TAGS.path_end, TAGS.path_start, 4, TAGS.path_end,
                                TAGS.conclusion_start, 8], TAGS, partial=True)
    with torch.no_grad():
        packed_forward(model, s)
    assert model.config._attn_implementation == "sdpa"
    drv = MultiverseDriver(TAGS, num_pages=64, page_size=1)
    cache = ForestKVCache.for_model(model, 64, 1)
    b = drv.start([1, 2, 3])
    with torch.no_grad():
        forest_forward(model, b.input_ids, b.position_ids, b.meta, cache, b.token_node, b.token_pos)
        after = model(ids).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    out = multiverse_generate(model, block_prompt(), tags=TAGS, max_new_tokens=20, max_path_tokens=3,
                              temperature=0)
    assert out.steps > 0 and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def test_scope_restores_on_error_and_nests():
    model = tiny()
    with pytest.raises(RuntimeError, match="boom"), use_multiverse_attention(model):
        assert model.config._attn_implementation == ATTN_NAME
        with use_multiverse_attention(model):  # nested: no change on the inner exit
            pass
        assert model.config._attn_implementation == ATTN_NAME
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_left_switched_model_says_how_to_switch_back():
    model = tiny()
    model.set_attn_implementation(register())
    with pytest.raises(ValueError, match=r"set_attn_implementation\('sdpa'\)"):
        model(torch.tensor([[1, 2]]))
    # ... and with the context manager it is told the previous implementation explicitly
    model.set_attn_implementation("eager")
    msg = r"set_attn_implementation\('eager'\)"
    with use_multiverse_attention(model), pytest.raises(ValueError, match=msg):
        model(torch.tensor([[1, 2]]))
    assert model.config._attn_implementation == "eager"


def test_gradient_checkpointing_needs_the_scope():
    model = tiny()
    model.gradient_checkpointing_enable()
    model.train()
    s = one_block()
    with pytest.raises(ValueError, match="use_multiverse_attention"):
        packed_forward(model, s)
    with use_multiverse_attention(model):  # forward and backward inside: the recompute sees the forest
        logits = packed_forward(model, s, backend="reference")
        logits.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_no_future_warnings():
    model = tiny()
    s = one_block()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            packed_forward(model, s)
            multiverse_generate(model, block_prompt(), tags=TAGS, max_new_tokens=12, max_path_tokens=2)
            kv = {cache_kwarg(model): transformers.DynamicCache(config=model.config)}
            model(torch.tensor([[1, 2, 3]]), use_cache=True, **kv)


def test_generate_greedy_matches_dense_mask_model():
    """temperature 0: every chosen token has the largest logit (over the ordinary words and the tags the
    structure allows) of the plain model on the flat sequence with the dense Multiverse mask."""
    model = tiny(torch.float64)
    # stop tokens are masked inside blocks: stopping at <Parallel> keeps the paths from nesting, so
    # they end by max_path_tokens and the flat sequence is a (partial) Multiverse sequence
    out = multiverse_generate(model, block_prompt(paths=3), tags=TAGS, max_new_tokens=40,
                              max_path_tokens=4, temperature=0, stop=[TAGS.parallel_start])
    assert out.num_forks == 1 and out.num_joins == 1 and out.finish_reason in ("length", "stop")
    assert out.new_tokens <= 40
    st = parse(out.token_ids, TAGS, partial=True)
    assert torch.equal(st.position_ids, out.position_ids)
    with torch.no_grad():
        dense = model(input_ids=out.token_ids[None], position_ids=out.position_ids[None],
                      attention_mask=st.dense_mask()[None, None], use_cache=False).logits[0]
    drv = out.driver
    _, _, index = drv.sequence()
    forced = {TAGS.path_start, TAGS.path_end, TAGS.conclusion_start}
    checked = 0
    for node, flat in index.items():
        flat = [f for f in flat.tolist() if f < out.token_ids.numel()]
        for a, b in zip(flat, flat[1:]):  # b was chosen from the logits of row a
            tok = int(out.token_ids[b])
            if b < out.prompt_len or tok in forced:
                continue
            # chosen over every ordinary word (and the tags the structure allowed at that point)
            assert float(dense[a, tok]) >= float(dense[a, :V].max()) - 1e-9, (node, b)
            checked += 1
    assert checked >= 10


def test_generate_sampling_budget_and_stops():
    model = tiny()
    a = multiverse_generate(model, block_prompt(), tags=TAGS, max_new_tokens=30, max_path_tokens=5,
                            temperature=0.8, top_p=0.9, seed=3, stop=[])
    b = multiverse_generate(model, block_prompt(), tags=TAGS, max_new_tokens=30, max_path_tokens=5,
                            temperature=0.8, top_p=0.9, seed=3, stop=[])
    assert torch.equal(a.token_ids, b.token_ids)  # seeded
    assert a.finish_reason == "length" and a.new_tokens <= 30 and a.num_forks == 1
    # every path ends by max_path_tokens: <Path> + 5 tokens + </Path>
    for p in a.driver._node_forks[0]:
        toks = a.driver.node_tokens(p)[0]
        assert toks[0] == TAGS.path_start and len(toks) <= 7
    # no block in the prompt: the budget is exact; a stop token ends at the top level
    c = multiverse_generate(model, [1, 2, 3], tags=TAGS, max_new_tokens=5, temperature=1.0, seed=0, stop=[])
    assert c.finish_reason == "length" and c.new_tokens == 5 and c.token_ids.numel() == 3 + 5
    d = multiverse_generate(model, [1, 2, 3], tags=TAGS, max_new_tokens=5, seed=0, stop=list(range(V + 10)))
    assert d.finish_reason == "stop" and d.token_ids.numel() == 4 and d.new_tokens == 0
    # inside a block stop tokens are masked: paths still fork and join
    even = list(range(0, V, 2))
    e = multiverse_generate(model, block_prompt(), tags=TAGS, max_new_tokens=30, max_path_tokens=3,
                            seed=1, stop=even)
    assert e.num_forks == 1
    for p in e.driver._node_forks[0]:
        assert not set(e.driver.node_tokens(p)[0]) & set(even)


def test_sample_next_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, float("-inf")]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 1.0, None).tolist() == [0, 0]
    draws = torch.stack([sample_next(logits, 1.0, 0.5, g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {0}  # top token alone holds >= 0.5 of the mass
    assert set(draws[:, 1].tolist()) <= {0, 1}  # 1/3 + 1/3 reaches 0.5; never the -inf token
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, 0.0, None)


@pytest.mark.parametrize("page_size", [1, 4])
def test_head_major_cache_same_logits(page_size):
    """ForestKVCache.for_model(head_major=True) (what multiverse_generate uses on CPU): [pages, page_size,
    Hk, D] views of [pages, Hk, page_size, D] storage; two driver steps give bitwise the token-major
    cache's logits and cache contents."""
    model = tiny()
    caches = {hm: ForestKVCache.for_model(model, 64, page_size, head_major=hm) for hm in (False, True)}
    k = caches[True].k[0]
    assert k.shape == caches[False].k[0].shape and k.transpose(1, 2).is_contiguous()
    logits = {}
    for hm, cache in caches.items():
        drv = MultiverseDriver(TAGS, num_pages=64, page_size=page_size)
        b = drv.start(block_prompt())
        with torch.no_grad():
            out = [forest_forward(model, b.input_ids, b.position_ids, b.meta, cache, b.token_node,
                                  b.token_pos)]
            b = drv.step([TAGS.path_start] * len(b.branches))
            out.append(forest_forward(model, b.input_ids, b.position_ids, b.meta, cache, b.token_node,
                                      b.token_pos))
        logits[hm] = out
    for a, b in zip(logits[False], logits[True], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(caches[False].k + caches[False].v, caches[True].k + caches[True].v, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    with pytest.raises(TypeError, match="head_major"):
        ForestKVCache.for_model(model, 8, 1, head_major="yes")
