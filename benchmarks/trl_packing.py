"""TRL tree packing on CPU: one log-prob + backward pass over a GRPO group (a prompt and G completions),
three ways (docs/training.md, "TRL"):

- ``ours``: TRL's own packer (``TreeRow.pack()``) through the drop-in ``tree_fa3`` attention of
  ``multiverse_kernels.integrations.trl`` (segments -> forest nodes, no K/V gathered);
- ``gather``: the same packed row through TRL's ``tree_attention`` semantics with a CPU varlen attention
  in place of FA3 (``k/v.index_select(0, tree_kv_index)``, then SDPA per segment over its gathered path:
  ``multiverse_kernels.integrations.trl.gather_tree_attention``);
- ``padded``: the unpacked batch, G rows of prompt + completion, SDPA causal (no prompt sharing).

Every (point, method) runs in a fresh process (peak RSS above the process's state after building the
model and inputs is the memory column); time is the pass (forward, log-probs of the completion tokens,
backward), best of ``--repeat``. The model is a small Qwen2 (``--hidden``, ``--layers``; fp32), so the
attention dominates. Also prints the GPU memory model on paper for a 7B-class model (bf16): K/V bytes of
the unique tokens, the gathered copies TRL's attention makes (saved for its backward), the saved
attention activations. Writes JSON (``--out``) and a markdown table.

    python benchmarks/trl_packing.py --out docs/img/trl_packing.json         # the full grid
    python benchmarks/trl_packing.py --groups 8 --prompts 1024 --completions 256   # one point
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_point(method: str, G: int, P: int, C: int, hidden: int, layers: int, repeat: int) -> dict:
    import torch
    import transformers
    from trl.experimental.async_grpo.packing import TreeRow

    from multiverse_kernels.integrations import trl as mk_trl

    torch.manual_seed(0)
    heads, kv_heads = max(1, hidden // 32), max(1, hidden // 128)
    cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, max_position_embeddings=P + C + 8)
    cfg._attn_implementation = "sdpa"
    model = transformers.Qwen2ForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 512, (P,), generator=g)
    comps = [torch.randint(0, 512, (C,), generator=g) for _ in range(G)]

    if method == "padded":
        ids = torch.stack([torch.cat([prompt, c]) for c in comps])

        def step():
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=C + 1).logits[:, :-1]
            lp = torch.log_softmax(logits, -1).gather(2, ids[:, P:, None])[..., 0]
            lp.sum().backward()
        tokens = ids.numel()
    else:
        row = TreeRow()
        for c in comps:
            ids = torch.cat([prompt, c])
            row.add(dict(input_ids=ids, completion_mask=torch.cat([torch.zeros(P), torch.ones(C)]).long(),
                         old_log_probs=torch.zeros(P + C), advantage=1.0, group_id=0))
        pk = row.pack()
        mq, mk = pk["tree_max_seqlens"].tolist()
        kw = dict(tree_kv_index=pk["tree_kv_index"], tree_cu_seqlens_q=pk["tree_cu_seqlens_q"],
                  tree_cu_seqlens_k=pk["tree_cu_seqlens_k"], tree_max_seqlen_q=mq, tree_max_seqlen_k=mk)
        if method == "ours":
            name = mk_trl.register("bench_ours", validate=False)
        else:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface

            def gather_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                 **k):
                q, kk, vv = (x[0].transpose(0, 1) for x in (query, key, value))
                out = mk_trl.gather_tree_attention(q, kk, vv, k["tree_kv_index"], k["tree_cu_seqlens_q"],
                                                   k["tree_cu_seqlens_k"], scaling=scaling)
                return out.unsqueeze(0), None

            name = "bench_gather"
            AttentionInterface.register(name, gather_attention)
            AttentionMaskInterface.register(name, lambda *a, **k: None)
        model.set_attn_implementation(name)
        inp, pos, rows, labels = (pk["input_ids"][None], pk["position_ids"][None], pk["token_index"],
                                  pk["shift_labels"][pk["token_index"]])

        def step():
            hs = model.model(input_ids=inp, position_ids=pos, use_cache=False, **kw).last_hidden_state[0]
            logits = model.lm_head(hs[rows])
            torch.log_softmax(logits, -1).gather(1, labels[:, None]).sum().backward()
        tokens = inp.numel()
    base = _rss_kb()
    times = []
    for _ in range(repeat):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(method=method, G=G, prompt=P, completion=C, forwarded_tokens=int(tokens),
                time_s=min(times), peak_mib=max(0, peak - base) / 1024)


def memory_model(G: int, P: int, C: int, layers: int = 28, kv_heads: int = 4, head_dim: int = 128,
                 q_heads: int = 28, nbytes: int = 2) -> dict:
    """GPU bytes per backward pass on paper, a Qwen2.5-7B-like model (bf16). TRL's trie forks one token
    early: a root of P - 1 tokens and G segments of C + 1."""
    unique = P - 1 + G * (C + 1)
    gathered = G * (P + C)  # every segment's whole root path
    kv_row = 2 * kv_heads * head_dim * nbytes  # K and V of one token, one layer
    q_row = q_heads * head_dim * nbytes
    return dict(
        unique_tokens=unique, gathered_rows=gathered,
        kv_unique_gib=layers * unique * kv_row / 2**30,
        gathered_copies_gib=layers * gathered * kv_row / 2**30,  # FA3 saves them for its backward
        # saved for the backward: k, v, q, out, lse per token
        saved_attention_ours_gib=layers * unique * (kv_row + 2 * q_row + q_heads * 4) / 2**30,
        saved_attention_gather_gib=layers * (unique * (kv_row + 2 * q_row + q_heads * 4)
                                             + gathered * kv_row) / 2**30,
        saved_attention_padded_gib=layers * gathered * (kv_row + 2 * q_row + q_heads * 4) / 2**30,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--completions", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--methods", nargs="+", default=["ours", "gather", "padded"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-padded-tokens", type=int, default=1 << 30,
                    help="skip the padded baseline above this many tokens (state it)")
    ap.add_argument("--points", nargs="+", default=None,
                    help="G,prompt,completion triples to run instead of the grid (a reduced grid)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_child", nargs=4, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        m, G, P, C = a._child
        print(json.dumps(run_point(m, int(G), int(P), int(C), a.hidden, a.layers, a.repeat)))
        return
    import torch

    with open("/proc/cpuinfo") as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    model_name = names[0] if names else platform.processor()
    points = ([tuple(int(x) for x in p.split(",")) for p in a.points] if a.points else
              [(G, P, C) for G in a.groups for P in a.prompts for C in a.completions])
    rows = []
    for G, P, C in points:
        for m in a.methods:
            if m == "padded" and G * (P + C) > a.max_padded_tokens:
                rows.append(dict(method=m, G=G, prompt=P, completion=C, skipped=True))
                continue
            cmd = [sys.executable, __file__, "--_child", m, str(G), str(P), str(C), "--hidden",
                   str(a.hidden), "--layers", str(a.layers), "--repeat", str(a.repeat)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                rows.append(dict(method=m, G=G, prompt=P, completion=C, error=r.stderr[-300:]))
                continue
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            x = rows[-1]
            print(f"G={G} P={P} C={C} {m:7s} {x['time_s']:8.2f} s {x['peak_mib']:9.0f} MiB",
                  flush=True)
    model = dict(hidden=a.hidden, layers=a.layers, heads=max(1, a.hidden // 32),
                 kv_heads=max(1, a.hidden // 128), dtype="fp32")
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=model_name, cores=os.cpu_count(),
                threads=torch.get_num_threads(), torch=torch.__version__, model=model, repeat=a.repeat,
                command=" ".join(["python", "benchmarks/trl_packing.py"] + sys.argv[1:]))
    paper = {f"G={G},P={P},C={C}": memory_model(G, P, C) for G in a.groups for P in a.prompts
             for C in a.completions}
    print(table(rows))
    print(paper_table(paper))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(meta=meta, results=rows, gpu_memory_model=paper), f, indent=1)


def table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["G"], r["prompt"], r["completion"]), {})[r["method"]] = r
    out = ["| G | prompt | completion | tokens ours / padded | time ours | gather | padded | peak MiB ours "
           "| gather | padded |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(r, k, fmt):
        if r is None:
            return "-"
        if r.get("skipped"):
            return "skipped"
        if "error" in r:
            return "error"
        return fmt.format(r[k])
    for (G, P, C), d in sorted(by.items()):
        o, g, p = d.get("ours"), d.get("gather"), d.get("padded")
        tok = f"{o['forwarded_tokens'] if o and 'forwarded_tokens' in o else '-'} / {G * (P + C)}"
        t = [f(r, "time_s", "{:.2f} s") for r in (o, g, p)]
        mem = [f(r, "peak_mib", "{:.0f}") for r in (o, g, p)]
        out.append(f"| {G} | {P} | {C} | {tok} | {' | '.join(t)} | {' | '.join(mem)} |")
    return "\n".join(out)


def paper_table(paper: dict) -> str:
    out = ["| point | unique tokens | gathered rows | K/V (unique) GiB | gathered copies GiB | saved attn "
           "ours GiB | gather GiB | padded GiB |", "|---|---|---|---|---|---|---|---|"]
    for k, m in paper.items():
        out.append(f"| {k} | {m['unique_tokens']} | {m['gathered_rows']} | {m['kv_unique_gib']:.2f} | "
                   f"{m['gathered_copies_gib']:.2f} | {m['saved_attention_ours_gib']:.2f} | "
                   f"{m['saved_attention_gather_gib']:.2f} | {m['saved_attention_padded_gib']:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
