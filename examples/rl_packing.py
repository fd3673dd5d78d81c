"""Packed vs unpacked RL training step (GRPO-style) with a small transformers model built from a config.

A group of N sampled completions shares one prompt. **Packed** (multiverse_kernels.rl): the prompt once
and the N completions as sibling nodes of one sequence of ``prompt + N * completion`` tokens, attention
over the forest (tree_attention, forward and backward), no mask. **Unpacked**: the usual recipe, a batch
of N rows ``prompt + completion_i`` through the same model with SDPA causal attention. Both compute the
same per-token log-probs and the same GRPO-style loss and gradients (tests/integrations/test_rl.py);
this prints
trajectory tokens/s (N * (prompt + completion) tokens per forward + backward, the same work for both)
and the peak memory of one step.

    python examples/rl_packing.py                       # prompt 1024, completions 128, N = 8 and 16
    python examples/rl_packing.py --groups 8 --completion 64 --repeats 1     # quicker
    python examples/rl_packing.py --check                # tiny: checks packed == unpacked, a few seconds

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the step; on CPU the growth of the process's
peak RSS (ru_maxrss) over the step, each (method, N) in a fresh process so peaks do not mask each other.
The model has random weights and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def build(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=8192)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = Qwen2ForCausalLM(cfg).to(dev, dtype)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, args.vocab, (args.prompt,), generator=g)
    comps = [torch.randint(0, args.vocab, (args.completion,), generator=g) for _ in range(args.n)]
    adv = torch.randn(args.n, generator=g).to(dev)
    return model, prompt, comps, adv


def packed_step(model, packed, adv, backend):
    from multiverse_kernels.rl import rollout_forward

    lp = packed.token_logprobs(rollout_forward(model, packed, backend=backend, validate=False))
    per = packed.per_sequence(lp, trainable_only=True)
    loss = -sum(a * x.mean() for a, x in zip(adv, per, strict=True))
    loss.backward()
    return per


def unpacked_step(model, prompt, comps, adv):
    ids = torch.stack([torch.cat([prompt, c]) for c in comps]).to(adv.device)
    logits = model(input_ids=ids, use_cache=False).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, ids[:, 1:, None])[..., 0]
    per = lp[:, prompt.numel() - 1:]  # completion tokens
    loss = -(adv * per.mean(1)).sum()
    loss.backward()
    return per


def child(args) -> None:
    """One (method, N) measurement in this process; prints a JSON line."""
    from multiverse_kernels.rl import pack_group

    torch.set_num_threads(args.threads) if args.threads else None
    model, prompt, comps, adv = build(args)
    cuda = model.device.type == "cuda"
    if args.method == "packed":
        packed = pack_group(prompt, comps, device=model.device)
        model.set_attn_implementation("sdpa")  # rollout_forward switches it to "multiverse"

        def step():
            return packed_step(model, packed, adv, args.backend)
    else:
        model.set_attn_implementation("sdpa")

        def step():
            return unpacked_step(model, prompt, comps, adv)

    if cuda:
        step()  # warm-up (Triton compile)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = args.n * (args.prompt + args.completion)
    print(json.dumps(dict(method=args.method, n=args.n, seconds=min(times), tokens=tokens,
                          tokens_per_s=tokens / min(times), peak_mib=peak / 2 ** 20)))


def check(args) -> None:
    """Tiny float32 run: packed log-probs and gradients equal the unpacked batch's."""
    from multiverse_kernels.rl import pack_group

    args.prompt, args.completion, args.n, args.hidden, args.layers, args.vocab = 24, 8, 4, 64, 2, 100
    args.heads, args.kv_heads, args.dtype = 4, 2, "float32"
    model, prompt, comps, adv = build(args)
    model.set_attn_implementation("sdpa")
    import copy

    alone = copy.deepcopy(model)
    packed = pack_group(prompt, comps, device=model.device)
    per_p = torch.stack(packed_step(model, packed, adv, args.backend))
    per_u = unpacked_step(alone, prompt, comps, adv)
    torch.testing.assert_close(per_p, per_u, atol=2e-5, rtol=2e-5)
    for (name, a), b in zip(model.named_parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=lambda m, nm=name: f"{nm}: {m}")
    print(f"OK: packed log-probs and gradients equal the unpacked batch's (N={args.n}, float32, "
          f"{packed.num_tokens} packed vs {packed.unpacked_tokens()} unpacked tokens)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens (default 1024)")
    p.add_argument("--completion", type=int, default=128, help="tokens per completion (default 128)")
    p.add_argument("--groups", default="8,16", help="group sizes N (default 8,16)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4, help="query heads (head_dim = hidden / heads)")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) / bfloat16 (CUDA default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", help="tree_attention backend of the packed run")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (min is kept)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="tiny correctness check, then exit")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.check:
        args.n = 4
        check(args)
        return
    if args.method:
        child(args)
        return
    dev = torch.device(args.device)
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"CPU, {args.threads or torch.get_num_threads()} threads")
    print(f"Qwen2 from config: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} "
          f"heads, vocab {args.vocab}, {args.dtype}; prompt {args.prompt}, completions {args.completion}; "
          f"{where}; packed backend {args.backend!r}")
    print(f"{'N':>4} {'method':<9} {'seq tokens':>11} {'tokens/s':>10} {'step s':>8} {'peak MiB':>9}")
    passthrough = []
    for name in ("prompt", "completion", "hidden", "layers", "heads", "kv_heads", "vocab", "dtype", "device",
                 "backend", "repeats", "threads", "seed"):
        passthrough += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for n in [int(x) for x in args.groups.split(",")]:
        rows = {}
        for method in ("unpacked", "packed"):
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--method", method, "--n", str(n)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{method} N={n} failed:\n{r.stderr[-4000:]}")
            rows[method] = json.loads(r.stdout.strip().splitlines()[-1])
        for method, r in rows.items():
            seq = args.prompt + n * args.completion if method == "packed" else r["tokens"]
            print(f"{n:>4} {method:<9} {seq:>11} {r['tokens_per_s']:>10.0f} {r['seconds']:>8.3f} "
                  f"{r['peak_mib']:>9.1f}")
        u, pk = rows["unpacked"], rows["packed"]
        print(f"{n:>4} packed/unpacked: {pk['tokens_per_s'] / u['tokens_per_s']:.2f}x tokens/s, "
              f"{pk['peak_mib'] / max(u['peak_mib'], 1e-9):.2f}x peak memory")


if __name__ == "__main__":
    main()
