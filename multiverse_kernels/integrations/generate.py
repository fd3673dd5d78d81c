"""One-call Multiverse generation with a transformers causal LM over a KV forest.

:func:`multiverse_generate` runs the :class:`~multiverse_kernels.multiverse.MultiverseDriver` loop with
:func:`~multiverse_kernels.integrations.transformers.forest_forward`: one forward pass per step for all
live branches (paths of a ``<Parallel>`` block decode side by side over the shared prompt, a conclusion
joins them), sampling with temperature and top-p, tags that would break the structure masked out, stop
tokens / strings at the top level, and a budget of new tokens. The model's attention is switched to
"multiverse" for the call only.

Example (any causal LM whose tokenizer has the ten Multiverse tags as tokens)::

    from multiverse_kernels.integrations.generate import multiverse_generate
    out = multiverse_generate(model, "Solve ...", tokenizer=tok, max_new_tokens=512, temperature=0.6,
                              top_p=0.95)
    print(out.text, out.finish_reason, out.num_forks)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..multiverse import MultiverseDriver, MultiverseTags
from .transformers import ForestKVCache, forest_forward, use_multiverse_attention

__all__ = ["multiverse_generate", "MultiverseGeneration", "sample_next"]


@dataclass
class MultiverseGeneration:
    """What :func:`multiverse_generate` returns.

    token_ids int64 [L]: prompt and generation flattened in Multiverse training order (trunk, path 1,
    ..., path k, conclusion, recursively; a final stop token is appended). position_ids int64 [L]: the
    Multiverse positions the model saw (the stop token gets the next one). ``text``: the decoded
    ``token_ids[prompt_len:]`` when a tokenizer was given. ``finish_reason``: "stop" (a stop token or
    string at the top level), "length" (``max_new_tokens`` reached) or "done" (no branch left).
    ``new_tokens``: tokens fed after the prompt (every branch, forced tags included). ``steps``: forward
    passes. ``driver``: the driver, for its forest and per-node tokens.
    """

    token_ids: Tensor
    position_ids: Tensor
    prompt_len: int
    text: str | None
    finish_reason: str
    new_tokens: int
    steps: int
    num_forks: int
    num_joins: int
    driver: MultiverseDriver


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
                ) -> Tensor:
    """One token per row of ``logits [R, V]`` (float; -inf = banned): greedy when ``temperature == 0``,
    else sampled from ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling). Returns int64 [R]."""
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sp, idx = probs.sort(dim=-1, descending=True)
        before = sp.cumsum(-1) - sp  # mass of the tokens ranked above each one
        sp = sp.masked_fill(before >= top_p, 0.0)  # keeps at least the top token
        probs = torch.zeros_like(probs).scatter_(-1, idx, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _ids(x: Any) -> list[int]:
    if isinstance(x, Tensor):
        return [int(t) for t in x.flatten().tolist()]
    return [int(t) for t in x]


def multiverse_generate(
    model: Any,
    prompt: str | Sequence[int] | Tensor,
    *,
    tokenizer: Any = None,
    tags: MultiverseTags | None = None,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Sequence[int | str] | None = None,
    max_path_tokens: int | None = None,
    page_size: int = 1,
    backend: str = "auto",
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> MultiverseGeneration:
    """Generate from ``prompt`` with Multiverse fork/join over a KV forest, in one call.

    Args:
        model: a transformers causal LM (Qwen2, Llama, ...; batch size 1, its own weights and dtype).
            Used as is; its attention implementation is restored afterwards.
        prompt: text (needs ``tokenizer``) or token ids.
        tokenizer: a transformers tokenizer: encodes a text prompt, supplies the tags (the ten
            Multiverse tags must be tokens of it), the default stop token (``eos_token_id``) and
            ``text``.
        tags: the tag ids (default: looked up in ``tokenizer``).
        max_new_tokens: budget of tokens fed after the prompt, over all branches (forced tags count).
            When the next step would exceed it, generation ends with finish_reason "length".
        temperature, top_p: sampling (``temperature=0``: greedy; ``top_p < 1``: nucleus).
        stop: stop token ids and/or strings. A stop token ends the generation when the top-level branch
            (outside every ``<Parallel>`` block) picks it; inside a block stop tokens are masked (paths
            end with ``</Path>``). A string stops when the decoded top-level text ends with it (needs
            ``tokenizer``). Default: the tokenizer's / model's EOS token(s).
        max_path_tokens: force ``</Path>`` once a path has this many tokens (None: the model decides).
        page_size: KV page size (1: token pool; 16: FlashInfer-style pages).
        backend: tree_attention backend ("auto": the fastest available for the model's device).
        seed / generator: randomness of the sampling.
    Returns:
        :class:`MultiverseGeneration`.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt: a text prompt needs tokenizer=")
        prompt_ids = _ids(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    else:
        prompt_ids = _ids(prompt)
    if not prompt_ids:
        raise ValueError("prompt: expected at least one token")
    if tags is None:
        if tokenizer is None:
            raise ValueError("tags: pass tags= or a tokenizer= that has the Multiverse tags")
        tags = MultiverseTags.from_tokenizer(tokenizer)
    stop_ids, stop_strs = _stops(stop, tokenizer, model)
    if stop_strs and tokenizer is None:
        raise ValueError("stop: stop strings need tokenizer=")
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)

    device = next(model.parameters()).device
    # The driver allocates a step's tokens when it makes the step, so the step that overruns the budget
    # (then not run) needs room too: at most one token per live branch and per new path, bounded by
    # the tokens so far. Every node starts on a fresh page (one partly used page per node; a node holds
    # at least two tokens of the budget, e.g. <Path> and </Path>).
    tokens_cap = len(prompt_ids) + 2 * max_new_tokens + 2
    num_pages = tokens_cap if page_size == 1 else (
        (tokens_cap + page_size - 1) // page_size + max_new_tokens // 2 + 2)
    drv = MultiverseDriver(tags, num_pages=num_pages, page_size=page_size, device=device)
    # (head-major on CPU: the faster layout for the cpu kernel, docs/api.md; same values and results)
    cache = ForestKVCache.for_model(model, num_pages, page_size, head_major=device.type == "cpu")
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = drv.start(prompt_ids)
    fed, steps, finish, stop_tok, drv_tokens = 0, 0, "done", None, None
    top_text: list[int] = []  # top-level tokens, for stop strings
    with torch.no_grad(), use_multiverse_attention(model):
        while batch is not None:
            logits = forest_forward(model, batch.input_ids, batch.position_ids, batch.meta, cache,
                                    batch.token_node, batch.token_pos, backend=backend, validate=False,
                                    logits_rows=batch.last_rows)
            steps += 1
            logits = logits[:, :vocab].float()
            for g, info in enumerate(batch.branches):
                ban = drv.banned_tokens(g)
                top_level = info.kind != "path" and info.depth == 0
                if not top_level:
                    ban = ban + stop_ids
                logits[g, [t for t in ban if t < vocab]] = float("-inf")
            nxt = sample_next(logits, temperature, top_p, generator).tolist()
            choice: list[int] = []
            for g, info in enumerate(batch.branches):
                t = nxt[g]
                if (max_path_tokens is not None and info.kind == "path"
                        and info.tokens_in_node >= max_path_tokens
                        and tags.path_end not in drv.banned_tokens(g)):
                    t = tags.path_end
                choice.append(t)
                if info.kind != "path" and info.depth == 0:
                    if t in stop_ids:
                        stop_tok, finish = t, "stop"
                    elif stop_strs:
                        top_text.append(t)
                        tail = tokenizer.decode(top_text[-64:])
                        if any(tail.endswith(s) for s in stop_strs):
                            stop_tok, finish = t, "stop"
            if finish == "stop":
                break
            nb = drv.step(choice)
            if nb is not None and fed + nb.meta.total_q > max_new_tokens:
                finish = "length"  # the driver already took these tokens; they are not fed
                drv_tokens = nb
                break
            if nb is not None:
                fed += nb.meta.total_q
            batch = nb
    ids, pos, _ = drv.sequence()
    if finish == "length":
        ids, pos = _drop_unfed(drv, drv_tokens, ids, pos)
    if stop_tok is not None:
        ids = torch.cat([ids, torch.tensor([stop_tok])])
        pos = torch.cat([pos, pos[-1:] + 1])
    text = tokenizer.decode(ids[len(prompt_ids):].tolist()) if tokenizer is not None else None
    return MultiverseGeneration(ids, pos, len(prompt_ids), text, finish, fed, steps, drv.num_forks,
                                drv.num_joins, drv)


def _drop_unfed(drv: MultiverseDriver, nb: Any, ids: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """The driver appends a batch's tokens when it makes the batch; drop those of the batch that was
    not run (the token budget ran out) from the flat sequence."""
    ids_l, pos_l = ids.tolist(), pos.tolist()
    _, _, index = drv.sequence()
    drop: set[int] = set()
    qo = nb.meta.qo_indptr.tolist()
    for g, info in enumerate(nb.branches):
        k = qo[g + 1] - qo[g]
        flat = index[info.node].tolist()
        drop.update(flat[len(flat) - k:])
    keep = [i for i in range(len(ids_l)) if i not in drop]
    return (torch.tensor([ids_l[i] for i in keep], dtype=torch.int64),
            torch.tensor([pos_l[i] for i in keep], dtype=torch.int64))


def _stops(stop: Sequence[int | str] | None, tokenizer: Any, model: Any) -> tuple[list[int], list[str]]:
    if stop is None:
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None:
            gc = getattr(model, "generation_config", None)
            eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos is None:
            return [], []
        return ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos]), []
    ids = [int(s) for s in stop if not isinstance(s, str)]
    strs = [s for s in stop if isinstance(s, str)]
    return ids, strs
