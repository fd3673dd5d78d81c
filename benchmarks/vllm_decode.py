"""vLLM decode throughput: multiverse_kernels' backend (``attention_backend="CUSTOM"``) vs vLLM's own.

For each model, prompt length P and parallel samples n (one request, ``SamplingParams(n=n)``; the n
samples share the prompt's full blocks through vLLM's prefix cache): decode tokens/s and attention
time per decode step of both backends, their ratio, and next to it the ratio predicted by the bytes a
step moves (weights + the KV blocks read: vLLM's own backend reads every sample's blocks, ours the
unique ones). Random-weight models built from configs (nothing downloaded): ``tiny`` (Qwen2, 4 layers,
hidden 512, 8/2 heads, head dim 64) and ``qwen05`` (Qwen2.5-0.5B's shape).

    python benchmarks/vllm_decode.py --models tiny --n 1,4,16,64 --prompts 1024,4096 --json out.json

Runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that engine steps and attention calls can be
timed: every decode step (an engine step after the first of a generation) is timed on its own, and
tok/s is n / the median step (robust to the stalls of a shared machine; the fastest step's ratio is
given too). Both engines live in the process at once and each case's ``--repeat`` generations
alternate between them, so that load that drifts hits both; the JSON keeps every step time, the
command, the date and the load average before and after.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB per engine (two engines)

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


def _gen(llm, SamplingParams, req, n: int, tokens: int) -> list[tuple[float, float]]:
    """Generate ``tokens`` tokens for each of the n samples; (seconds, attention seconds) of every engine
    step after the first (the first prefills the prompt's uncached tail: the others are decode steps
    of all n samples)."""
    sp = SamplingParams(n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    eng = llm.llm_engine
    orig = eng.step
    steps: list[tuple[float, float]] = []

    def step(*a, **k):
        t, a0 = time.perf_counter(), _ATTN["t"]
        try:
            return orig(*a, **k)
        finally:
            steps.append((time.perf_counter() - t, _ATTN["t"] - a0))

    eng.step = step
    try:
        llm.generate(req, sp, use_tqdm=False)
    finally:
        del eng.step
    return steps[1:]


def _run(path: str, cases, T: int, dtype: str, bs: int, repeat: int) -> dict:
    """Both engines (vLLM's backend, ours) alive in this process; per case, its generations alternate
    between them (vLLM's first in even repeats, ours first in odd ones). Returns {backend: {case: steps}}."""
    from vllm import LLM, SamplingParams

    max_len = max(P for P, _ in cases) + T + 8
    mem = dict(gpu_memory_utilization=0.4) if torch.cuda.is_available() else {}  # two engines on one GPU
    llms = {b: LLM(path, dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, max_model_len=max_len,
                   block_size=bs, max_num_seqs=64, max_num_batched_tokens=8192, enable_prefix_caching=True,
                   seed=0, **mem, **(dict(attention_backend=b) if b else {}))
            for b in (None, "CUSTOM")}
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from multiverse_kernels.integrations.vllm import STATS, MultiverseAttentionImpl

    _wrap_forward(CPUAttentionBackendImpl)
    _wrap_forward(MultiverseAttentionImpl)
    out: dict = {None: {}, "CUSTOM": {}}
    try:
        for P, n in cases:
            prompt = torch.randint(0, 30000, (P,), generator=torch.Generator().manual_seed(P)).tolist()
            req = [{"prompt_token_ids": prompt}]
            for llm in llms.values():  # prefill; the prompt's full blocks go to the prefix cache
                _gen(llm, SamplingParams, req, n, 2)
            steps: dict = {None: [], "CUSTOM": []}
            for r in range(repeat):
                for b in ((None, "CUSTOM") if r % 2 == 0 else ("CUSTOM", None)):
                    ours_before = STATS["steps"]
                    steps[b] += _gen(llms[b], SamplingParams, req, n, T)
                    if (STATS["steps"] > ours_before) != (b == "CUSTOM"):
                        raise RuntimeError(f"engine {b or 'default'} ran the wrong attention backend")
            for b, st in steps.items():
                out[b][f"{P}x{n}"] = st
                med, fastest = statistics.median(s for s, _ in st), min(s for s, _ in st)
                print(f"  {b or 'default'} P={P} n={n}: {len(st)} decode steps, median {1e3 * med:.2f} ms "
                      f"({n / med:.0f} tok/s), fastest {1e3 * fastest:.2f} ms", flush=True)
    finally:
        del llms
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
    ap.add_argument("--repeat", type=int, default=3, help="generations of each case per engine, alternating")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    Ps = [int(x) for x in args.prompts.split(",")]
    cases = [(P, n) for P in Ps for n in ns]
    dt = getattr(torch, args.dtype)
    import vllm

    from multiverse_kernels.info import cpu_model

    machine = (f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, vllm {vllm.__version__}")
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            path, cfg = _save(name, dt, root)
            res = _run(path, cases, args.tokens, args.dtype, args.block_size, args.repeat)
            for P, n in cases:
                a, b = res[None][f"{P}x{n}"], res["CUSTOM"][f"{P}x{n}"]
                sa, sb = statistics.median(x for x, _ in a), statistics.median(x for x, _ in b)
                wb, kvb = _bytes_per_step(cfg, dt, P, n, args.tokens, args.block_size, shared=False)
                wo, kvo = _bytes_per_step(cfg, dt, P, n, args.tokens, args.block_size, shared=True)
                aa, ab = statistics.median(y for _, y in a), statistics.median(y for _, y in b)
                rows.append(dict(model=name, prompt=P, n=n, steps=(len(a), len(b)), vllm_tok_s=n / sa,
                                 ours_tok_s=n / sb, ratio=sa / sb,
                                 fastest_ratio=min(x for x, _ in a) / min(x for x, _ in b),
                                 predicted_ratio=wb / wo, vllm_attn_ms=1e3 * aa, ours_attn_ms=1e3 * ab,
                                 attn_ratio=aa / max(ab, 1e-12), predicted_attn_ratio=kvb / kvo,
                                 vllm_step_ms=[round(1e3 * x, 4) for x, _ in a],
                                 ours_step_ms=[round(1e3 * x, 4) for x, _ in b]))
    load_after = os.getloadavg()
    hdr = ("model", "P", "n", "vLLM tok/s", "ours tok/s", "ratio", "fastest-step ratio", "pred",
           "vLLM attn ms", "ours attn ms", "attn ratio", "pred")
    print(f"\nmachine: {machine}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"{started}; dtype {args.dtype}, block size {args.block_size}; per case and backend "
          f"{args.repeat} generations of {args.tokens} tokens, alternating between the engines: tok/s "
          "and attention ms from the median decode step")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r['model']} | {r['prompt']} | {r['n']} | {r['vllm_tok_s']:.0f} | {r['ours_tok_s']:.0f} | "
              f"{r['ratio']:.2f}x | {r['fastest_ratio']:.2f}x | {r['predicted_ratio']:.2f}x | "
              f"{r['vllm_attn_ms']:.2f} | {r['ours_attn_ms']:.2f} | {r['attn_ratio']:.2f}x | "
              f"{r['predicted_attn_ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, command=" ".join(["python"] + sys.argv), started=started,
                           load_average_before=load_before, load_average_after=load_after,
                           dtype=args.dtype, block_size=args.block_size, tokens=args.tokens,
                           repeat=args.repeat, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
