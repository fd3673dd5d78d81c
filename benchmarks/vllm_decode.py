"""vLLM decode throughput: multiverse_kernels' backend (``attention_backend="CUSTOM"``) vs vLLM's own.

For each model, prompt length P and parallel samples n (one request, ``SamplingParams(n=n)``; the n
samples share the prompt's full blocks through vLLM's prefix cache): decode tokens/s and attention
time per decode step of both backends, their ratio, and next to it the ratio predicted by the bytes a
step moves (weights + the KV blocks read: vLLM's own backend reads every sample's blocks, ours the
unique ones). Random-weight models built from configs (nothing downloaded): ``tiny`` (Qwen2, 4 layers,
hidden 512, 8/2 heads, head dim 64) and ``qwen05`` (Qwen2.5-0.5B's shape).

    python benchmarks/vllm_decode.py --models tiny --n 1,4,16,64 --prompts 1024,4096 --json out.json

Runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the attention calls can be timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

import torch  # noqa: E402

MODELS = {
    "tiny": dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2),
    "qwen05": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2),
}

_ATTN = {"t": 0.0, "calls": 0}


def _wrap_forward(cls) -> None:
    if getattr(cls.forward, "_timed", False):
        return
    orig = cls.forward

    def forward(self, layer, query, *a, **k):
        t = time.perf_counter()
        try:
            return orig(self, layer, query, *a, **k)
        finally:
            _ATTN["t"] += time.perf_counter() - t
            _ATTN["calls"] += 1

    forward._timed = True
    cls.forward = forward


def _save(name: str, dtype: torch.dtype, root: str) -> tuple[str, dict]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(max_position_embeddings=8192, tie_word_embeddings=True, **MODELS[name])
    path = os.path.join(root, name)
    transformers.Qwen2ForCausalLM(cfg).to(dtype).save_pretrained(path)
    return path, MODELS[name]


def _bytes_per_step(cfg: dict, dtype: torch.dtype, P: int, n: int, T: int, bs: int, shared: bool) -> float:
    """Bytes a decode step moves (mean over the T steps): weights once + the KV blocks it reads."""
    es = torch.tensor([], dtype=dtype).element_size()
    h, L, inter, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kvh = cfg["num_key_value_heads"]
    weights = (L * (h * h * 2 + 2 * h * kvh * d + 3 * h * inter) + V * h) * es
    per_tok = 2 * L * kvh * d * es
    t = T / 2  # mean generated tokens
    prompt_blocks = (P // bs) * bs  # the full blocks the samples share
    if shared:
        kv = prompt_blocks + n * (P + t - prompt_blocks)
    else:
        kv = n * (P + t)
    return weights + kv * per_tok, kv * per_tok


def _gen(llm, SamplingParams, req, n: int, tokens: int) -> tuple[float, float, int]:
    sp = SamplingParams(n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    a0, c0 = _ATTN["t"], _ATTN["calls"]
    llm.generate(req, sp, use_tqdm=False)
    return time.perf_counter() - t0, _ATTN["t"] - a0, _ATTN["calls"] - c0


def _run(path: str, backend: str | None, cases, T: int, dtype: str, bs: int) -> dict:
    from vllm import LLM, SamplingParams

    kw = dict(attention_backend=backend) if backend else {}
    max_len = max(P for P, _ in cases) + T + 8
    llm = LLM(path, dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, max_model_len=max_len,
              block_size=bs, max_num_seqs=64, max_num_batched_tokens=8192, enable_prefix_caching=True,
              seed=0, **kw)
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from multiverse_kernels.integrations.vllm import MultiverseAttentionImpl

    _wrap_forward(CPUAttentionBackendImpl)
    _wrap_forward(MultiverseAttentionImpl)
    out = {}
    try:
        for P, n in cases:
            prompt = torch.randint(0, 30000, (P,), generator=torch.Generator().manual_seed(P)).tolist()
            req = [{"prompt_token_ids": prompt}]
            _gen(llm, SamplingParams, req, n, 2)  # prefill; the prompt's full blocks go to the prefix cache
            t1, a1, c1 = _gen(llm, SamplingParams, req, n, 1)
            tT, aT, cT = _gen(llm, SamplingParams, req, n, T)
            dt = tT - t1
            out[f"{P}x{n}"] = dict(prompt=P, n=n, decode_tok_s=n * (T - 1) / dt,
                                   attn_ms_per_step=1e3 * (aT - a1) / max(T - 1, 1))
            print(f"  {backend or 'default'} P={P} n={n}: {out[f'{P}x{n}']}", flush=True)
    finally:
        del llm
        gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny")
    ap.add_argument("--n", default="1,4,16,64")
    ap.add_argument("--prompts", default="1024,4096")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block-size", type=int, default=128, help="vLLM's CPU default")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    Ps = [int(x) for x in args.prompts.split(",")]
    cases = [(P, n) for P in Ps for n in ns]
    dt = getattr(torch, args.dtype)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            path, cfg = _save(name, dt, root)
            res = {b: _run(path, b, cases, args.tokens, args.dtype, args.block_size)
                   for b in (None, "CUSTOM")}
            for P, n in cases:
                a, b = res[None][f"{P}x{n}"], res["CUSTOM"][f"{P}x{n}"]
                wb, kvb = _bytes_per_step(cfg, dt, P, n, args.tokens, args.block_size, shared=False)
                wo, kvo = _bytes_per_step(cfg, dt, P, n, args.tokens, args.block_size, shared=True)
                rows.append(dict(model=name, prompt=P, n=n, vllm_tok_s=a["decode_tok_s"],
                                 ours_tok_s=b["decode_tok_s"], ratio=b["decode_tok_s"] / a["decode_tok_s"],
                                 predicted_ratio=wb / wo, vllm_attn_ms=a["attn_ms_per_step"],
                                 ours_attn_ms=b["attn_ms_per_step"],
                                 attn_ratio=a["attn_ms_per_step"] / max(b["attn_ms_per_step"], 1e-9),
                                 predicted_attn_ratio=kvb / kvo))
    hdr = ("model", "P", "n", "vLLM tok/s", "ours tok/s", "ratio", "pred", "vLLM attn ms", "ours attn ms",
           "attn ratio", "pred")
    print(f"\nmachine: {machine}; dtype {args.dtype}, block size {args.block_size}, "
          f"{args.tokens} decode steps")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r['model']} | {r['prompt']} | {r['n']} | {r['vllm_tok_s']:.0f} | {r['ours_tok_s']:.0f} | "
              f"{r['ratio']:.2f}x | {r['predicted_ratio']:.2f}x | {r['vllm_attn_ms']:.2f} | "
              f"{r['ours_attn_ms']:.2f} | {r['attn_ratio']:.2f}x | {r['predicted_attn_ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, dtype=args.dtype, block_size=args.block_size, tokens=args.tokens,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
