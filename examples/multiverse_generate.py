"""Multiverse generation with a stock transformers model over a KV forest (nothing is downloaded).

Builds a small Qwen2 from a config with random weights and a local word-level tokenizer, adds the ten
Multiverse tag tokens (resizing the embeddings), and generates greedily: a prompt that opens a
``<Parallel>`` block with one ``<Outline>`` per path, the paths decoded side by side over the shared
prompt, a forced ``</Path>`` after ``--path-len`` tokens, and a conclusion that joins them.

It prints tokens/s and the K/V bytes the attention reads, for the forest (every shared page read once
per step by the KV-partitioned backends) and for a per-path baseline (the same generation where each path
reads its whole context on its own, what a per-branch paged decode kernel does), next to the unique K/V
bytes of the forest (the lower bound). K/V bytes come from the backend's registered
``tree_attention_kv_bytes`` hook (counted at the kernel's loads) when it has one, else from the metadata
(each group's visible tokens: what the reference backend gathers); the output says which.

    python examples/multiverse_generate.py [--paths 4] [--path-len 24] [--page-size 1] [--backend auto]
"""

from __future__ import annotations

import argparse
import time

import torch


def build(args):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from multiverse_kernels.multiverse import TAG_STRINGS, MultiverseTags

    words = ["[UNK]"] + [f"w{i}" for i in range(args.words)]
    base = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=base, unk_token="[UNK]")
    n_words = len(tok)
    cfg = Qwen2Config(vocab_size=n_words, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, args.dtype)).eval()
    # add the Multiverse tags as special tokens and grow the embeddings for them
    tok.add_special_tokens({"additional_special_tokens": list(TAG_STRINGS.values())})
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():  # random but not tiny weights, so greedy choices depend on the context
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    tags = MultiverseTags.from_tokenizer(tok)
    return tok, model, tags, n_words


def generate(model, tags, prompt_ids, args, *, per_path: bool, measure: str | None, n_words: int):
    """One greedy generation. Returns (driver, decode seconds, decoded tokens, kv bytes read, logits)."""
    from multiverse_kernels.integrations.transformers import (
        ForestContext,
        ForestKVCache,
        forest_forward,
        kv_bytes_hook,
        kv_elements_read,
        unshared_metadata,
    )
    from multiverse_kernels.multiverse import MultiverseDriver

    num_pages = 8 * (len(prompt_ids) + args.paths * (args.path_len + 2) + args.concl_len + 8)
    drv = MultiverseDriver(tags, num_pages=num_pages, page_size=args.page_size)
    cache = ForestKVCache.for_model(model, num_pages, args.page_size)
    ctx = ForestContext(meta=None)  # type: ignore[arg-type]
    _, hook = kv_bytes_hook(args.backend, "cpu")
    if measure == "hook":
        ctx.kv_bytes_hook = hook
    elif measure == "count":
        ctx.count_reads = True
    unique = 0
    per_token = cache.nbytes_per_token() // args.layers  # K+V bytes of one token in one layer
    logits_log: dict[tuple[int, int], torch.Tensor] = {}
    batch = drv.start(prompt_ids)
    decoded, t_decode, first = 0, 0.0, True
    while batch is not None:
        t0 = time.perf_counter()
        attn_meta = unshared_metadata(batch.meta) if per_path else None
        with torch.no_grad():
            rows = None if args.check else batch.last_rows  # lm_head only where a token is picked
            logits = forest_forward(model, batch.input_ids, batch.position_ids, batch.meta, cache,
                                    batch.token_node, batch.token_pos, backend=args.backend,
                                    validate=False, ctx=ctx, attn_meta=attn_meta, logits_rows=rows)
        last = logits[batch.last_rows] if rows is None else logits
        nxt = last[:, :n_words].argmax(-1).tolist()  # greedy among ordinary words
        elapsed = time.perf_counter() - t0
        if not first:  # tokens/s of the decode steps (the prefill is one extend of the whole prompt)
            t_decode += elapsed
            decoded += batch.meta.total_q
        first = False
        unique += kv_elements_read(batch.meta, per_group=False) * per_token * args.layers
        if args.check:
            qo = batch.meta.qo_indptr.tolist()
            for g, info in enumerate(batch.branches):
                for r in range(qo[g], qo[g + 1]):
                    logits_log[(info.node, info.tokens_in_node - (qo[g + 1] - r))] = logits[r]
        # forced tags: each path ends after --path-len tokens, the conclusion after --concl-len
        choice: list = []
        done = False
        for g, info in enumerate(batch.branches):
            if info.kind == "path" and info.tokens_in_node >= args.path_len:
                choice.append(tags.path_end)
            elif info.kind == "conclusion" and info.tokens_in_node >= args.concl_len:
                if info.tokens_in_node > args.concl_len:
                    done = True
                choice.append([tags.conclusion_end, tags.parallel_end])  # one extend step
            else:
                choice.append(nxt[g])
        if done:
            break
        batch = drv.step(choice)
    kv = sum(ctx.kv_bytes) if measure == "hook" else sum(ctx.kv_reads)
    return drv, t_decode, decoded, kv, unique, logits_log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=96, help="prompt words before the <Parallel> block")
    ap.add_argument("--path-len", type=int, default=24)
    ap.add_argument("--concl-len", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=1,
                    help="1: SGLang-style token pool; 16: FlashInfer-style page table")
    ap.add_argument("--backend", default="auto", help="tree_attention backend (auto: fastest available)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--words", type=int, default=64, help="ordinary vocabulary size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (best is reported)")
    ap.add_argument("--check", action="store_true",
                    help="also run the plain model on the flat sequence with the dense Multiverse mask and "
                         "report the largest logit difference")
    args = ap.parse_args()

    from multiverse_kernels.integrations.transformers import kv_bytes_hook
    from multiverse_kernels.multiverse import parse

    tok, model, tags, n_words = build(args)
    g = torch.Generator().manual_seed(args.seed)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(args.words, (n,), generator=g))
    outlines = " ".join(f"<Outline> {words(3)} </Outline>" for _ in range(args.paths))
    text = f"{words(args.prefix)} <Parallel> <Goal> {words(4)} {outlines} </Goal>"
    prompt_ids = tok(text)["input_ids"]

    backend, hook = kv_bytes_hook(args.backend, "cpu")
    measure = "hook" if hook is not None else "count"
    print(f"model: Qwen2 with random weights, {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
          f"/ {args.kv_heads} KV heads, vocab {len(tok)} ({n_words} words + 10 Multiverse tags), "
          f"{args.dtype}")
    print(f"tree_attention backend: {backend}" + (" (auto)" if args.backend == "auto" else "")
          + f" | page size {args.page_size} | prompt {len(prompt_ids)} tokens, {args.paths} paths x "
          f"{args.path_len} tokens, conclusion {args.concl_len}+2 tokens")

    modes = (("forest (shared pages)", False), ("per-path baseline", True))
    best: dict[bool, float] = {}
    for _ in range(args.repeats):  # interleaved timed runs, best of each
        for _label, per_path in modes:
            drv, t, n, _, unique, log = generate(model, tags, prompt_ids, args, per_path=per_path,
                                                 measure=None, n_words=n_words)
            best[per_path] = min(best.get(per_path, t), t)
            if not per_path:
                forest_log, forest_drv, unique_bytes, n_decoded = log, drv, unique, n
            else:
                baseline_ids = drv.sequence()[0]
    rows = []
    for label, per_path in modes:  # one more run each with the K/V byte measurement on
        drv, _, _, kv, _, _ = generate(model, tags, prompt_ids, args, per_path=per_path, measure=measure,
                                       n_words=n_words)
        rows.append((label, n_decoded / best[per_path], kv, drv.sequence()[0]))
    assert torch.equal(rows[1][3], baseline_ids)
    assert torch.equal(rows[0][3], rows[1][3]), "the two runs generated different tokens"
    ids, pos, index = forest_drv.sequence()
    print(f"generated {ids.numel() - len(prompt_ids)} tokens ({rows[0][3].numel()} in the flat sequence), "
          f"{forest_drv.num_forks} fork / {forest_drv.num_joins} join, positions "
          f"{'match' if torch.equal(parse(ids, tags).position_ids, pos) else 'DO NOT match'} parse()")
    print(f"{'':24s}{'decode tokens/s':>16s}{'KV bytes read':>16s}")
    for label, tps, kv, _ in rows:
        print(f"{label:24s}{tps:16.1f}{kv:16,d}")
    print(f"{'unique KV (lower bound)':24s}{'':16s}{unique_bytes:16,d}")
    print("KV bytes read: sum over all steps and layers, "
          + (f"measured by the {backend} backend's tree_attention_kv_bytes hook (counted at its loads)"
             if measure == "hook" else
             f"counted from the metadata (each group's visible tokens; the {backend} backend has no "
             f"measurement hook and gathers every group's context)"))
    print(f"per-path / forest KV bytes: {rows[1][2] / max(rows[0][2], 1):.2f}x (tokens/s of a model this "
          f"small is dominated by per-call overheads, not by K/V traffic)")
    if args.check:
        mask = parse(ids, tags).dense_mask()
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            dense = model(input_ids=ids[None], position_ids=pos[None], attention_mask=mask[None, None],
                          use_cache=False).logits[0]
        err = max(float((forest_log[(n, j)] - dense[int(fi)]).abs().max())
                  for n, flat in index.items() for j, fi in enumerate(flat.tolist()) if (n, j) in forest_log)
        print(f"check: max |logits(forest) - logits(dense Multiverse mask)| = {err:.3g}")


if __name__ == "__main__":
    main()
