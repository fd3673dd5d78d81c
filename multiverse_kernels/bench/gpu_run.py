"""The GPU run: one entry point that proves and measures every GPU path on a machine with an NVIDIA GPU.

    python -m multiverse_kernels.gpu_run --list                       # the steps, their limits
    python -m multiverse_kernels.gpu_run --step build [--results F]   # one step (what a lent machine runs)
    python -m multiverse_kernels.gpu_run [--results F]                # every step in order
    python -m multiverse_kernels.gpu_run --dry-run                    # every step: "skipped: no GPU (...)"

Each step runs its commands as child processes with a wall-clock limit (every step's limit is under 8
minutes, so one step fits a 10-minute command on a lent machine) and appends what it printed, its exit
status and its time to one results file (default ``gpu_results.txt``). Without a CUDA GPU (or with
``--dry-run``) every step appends ``skipped: no GPU (<reason>)`` and the commands it would have run, and
the exit status is 0; on a GPU the exit status is non-zero when any step failed. docs/gpu.md says what
each step does and how long it takes.

Steps, in order:
  env        GPU, driver, torch / Triton / CUDA versions, nvcc, ncu, compute-sanitizer
  build      C++ + CUDA extension in place against THIS machine's torch (arch: this GPU's; strict)
  triton     tests/backends/test_gpu.py for backend triton (compiled kernels: every tile, dtypes, page
             sizes...) and the triton cases of tests/ops/test_<op>.py
  cuda       tests/backends/test_gpu.py for backend cuda, tests/backends/test_cuda_ops.py (kv-byte counter,
             graph capture, sliding window / soft-cap / fp8 KV caches on both kernels) and the cuda cases of
             tests/ops/test_<op>.py (test_variants.py: each variant equals the reference or is refused)
  graph      CUDA-graph capture of the public op, replayed with another step's plan copied in; device
             guard and current stream (part of the two steps above, run on their own for a clear line)
  vllm       the vLLM backend (attention_backend="CUSTOM") on the GPU: tests/integrations/test_vllm.py
             and a short decode benchmark vs vLLM's own backend; skipped, with the reason, when vLLM is
             not importable on the machine
  memcheck   compute-sanitizer --tool memcheck over a small workload (both backends, fp16/bf16/fp32,
             window + soft-cap, fp8 caches)
  racecheck  compute-sanitizer --tool racecheck over the same workload (shared-memory races)
  bench      the main job on the GPU (fp16): CUDA graphs + events, L2 flushed, copy-bandwidth share
  bench-bf16 the same in bf16
  ncu        DRAM bytes read per method (Nsight Compute) next to the unique KV bytes
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

STEP_LIMIT_S = 470  # < 8 minutes per step
# the per-op test files, parametrised over backends (their triton and cuda cases run in the GPU steps)
OP_TESTS = ("tests/ops/test_tree_attention.py", "tests/ops/test_tree_attention_backward.py",
            "tests/ops/test_merge_states.py", "tests/ops/test_append_paged_kv.py",
            "tests/ops/test_variants.py")  # attention variants: each backend equals the reference or refuses
# the checkout (tests/, setup.py): three levels above multiverse_kernels/bench/gpu_run.py
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Step:
    name: str
    what: str
    commands: list[list[str]]
    limit_s: int = STEP_LIMIT_S
    env: dict[str, str] = field(default_factory=dict)
    skip_reason: Callable[[], str | None] | None = None  # checked on a GPU before the step runs


def _vllm_missing() -> str | None:
    """Why the vllm step cannot run here (vLLM not importable), or None."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not importable on this machine (pip install vllm)"
    return None


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _pytest(*args: str) -> list[str]:
    return _py("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args)


def _arch() -> str:
    """This GPU's TORCH_CUDA_ARCH_LIST entry (9.0a on H100/H200, 10.0a on B200)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    cap = f"{major}.{minor}"
    return cap + "a" if cap in ("9.0", "10.0") else cap + "+PTX"


def steps(sanitizer: str = "compute-sanitizer") -> list[Step]:
    """The GPU run's steps (commands are built lazily enough to be listed without a GPU)."""
    compiled = {"TRITON_INTERPRET": "0", "MULTIVERSE_REQUIRE_CPP": "1"}
    small = _py("-m", "multiverse_kernels.gpu_run", "--sanitizer-workload")
    return [
        Step("env", "GPU, driver and toolchain versions", [
            ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version,clocks.max.sm",
             "--format=csv"],
            _py("-c", "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
                      "'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(), "
                      "torch.cuda.get_device_capability())"),
            ["bash", "-c", "command -v nvcc && nvcc --version | tail -2; command -v ncu; "
                           "command -v compute-sanitizer; true"],
        ]),
        Step("build", "C++ + CUDA extension in place against this machine's torch", [
            _py("setup.py", "-q", "build_ext", "--inplace"),
            _py("-c", "import multiverse_kernels.backends.cpu, multiverse_kernels.backends.cuda; "
                      "print('extensions _C and _C_cuda load')"),
        ], env={"MULTIVERSE_BUILD_CUDA": "1", "MULTIVERSE_BUILD_STRICT": "1",
                "MAX_JOBS": str(os.cpu_count() or 8), "TORCH_CUDA_ARCH_LIST": "<this GPU>"}),
        Step("triton", "compiled Triton kernels vs the reference on CUDA tensors",
             [_pytest("-m", "gpu", "tests/backends/test_gpu.py", "-k", "triton"),
              _pytest("-m", "not slow", *OP_TESTS, "-k", "triton")], env=compiled),
        Step("cuda", "CUDA C++ kernels vs the reference on CUDA tensors",
             [_pytest("-m", "gpu", "tests/backends/test_gpu.py", "tests/backends/test_cuda_ops.py", "-k",
                      "not triton"),
              _pytest("-m", "gpu and not slow", *OP_TESTS, "-k", "cuda")], env=compiled),
        Step("graph", "CUDA graphs of the public op with a new plan copied in; device guard; stream",
             [_pytest("-m", "gpu", "tests/backends/test_gpu.py", "tests/backends/test_cuda_ops.py", "-k",
                      "graph or device or stream"),
              # the vLLM backend's fixed buffers (no vLLM needed): captured once, replayed with new steps
              _pytest("-m", "gpu", "tests/integrations/test_vllm_fixed_buffers.py")], env=compiled),
        Step("vllm", "vLLM with attention_backend=\"CUSTOM\" on the GPU: generations vs vLLM's own backend, "
             "decode throughput", [
                 _pytest("-m", "slow or not slow", "tests/integrations/test_vllm.py"),
                 _py("benchmarks/vllm_decode.py", "--models", "tiny", "--n", "1,16", "--prompts", "4096",
                     "--block-size", "16", "--json", "vllm_decode_gpu.json"),
             ], env={"TRITON_INTERPRET": "0"}, skip_reason=_vllm_missing),
        Step("nccl", "context-parallel tree attention over NCCL, one GPU per rank (pytest skips it, with the "
             "reason, on fewer than 2 GPUs: one GPU cannot hold two NCCL ranks)",
             [_pytest("tests/integrations/test_distributed.py", "-k", "ranks", "-rs")],
             env={**compiled, "MK_DIST_BACKEND": "nccl"}),
        Step("memcheck", "compute-sanitizer memcheck over a small workload",
             [[sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--target-processes", "all",
               *small]], env=compiled),
        Step("racecheck", "compute-sanitizer racecheck over a small workload",
             [[sanitizer, "--tool", "racecheck", "--error-exitcode", "1", "--target-processes", "all",
               *small]], env=compiled),
        Step("bench", "main job on the GPU, fp16 (CUDA graphs, events, L2 flushed)",
             [_py("-m", "multiverse_kernels.bench", "--device", "cuda", "--dtype", "float16", "--iters",
                  "30")], env={"TRITON_INTERPRET": "0"}),
        Step("bench-bf16", "main job on the GPU, bf16",
             [_py("-m", "multiverse_kernels.bench", "--device", "cuda", "--dtype", "bfloat16", "--iters",
                  "30")], env={"TRITON_INTERPRET": "0"}),
        Step("ncu", "DRAM bytes per method from Nsight Compute next to the unique KV bytes",
             [_py("-m", "multiverse_kernels.bench.ncu", "--ncu-table", "--dtype", "float16")],
             env={"TRITON_INTERPRET": "0"}),
    ]


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the GPU steps, or None."""
    try:
        import torch
    except ImportError as e:
        return f"torch not importable: {e}"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
    sys.stdout.write(text)
    sys.stdout.flush()


def run_step(step: Step, results: str, dry_reason: str | None) -> bool:
    """Run one step (or report it skipped); append to ``results``. True when it passed or was skipped."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _append(results, f"\n== step {step.name}: {step.what} (limit {step.limit_s} s) {stamp}\n")
    env = dict(os.environ, **step.env)
    if step.name == "build" and dry_reason is None:
        env["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", _arch())
    shown_env = " ".join(f"{k}={env[k] if dry_reason is None else v}" for k, v in step.env.items())
    for cmd in step.commands:
        _append(results, f"$ {shown_env + ' ' if shown_env else ''}{shlex.join(cmd)}\n")
    if dry_reason is not None:
        _append(results, f"-> {step.name}: skipped: no GPU ({dry_reason})\n")
        return True
    why = step.skip_reason() if step.skip_reason is not None else None
    if why is not None:
        _append(results, f"-> {step.name}: skipped: {why}\n")
        return True
    t0 = time.monotonic()
    ok = True
    for cmd in step.commands:
        left = step.limit_s - (time.monotonic() - t0)
        if cmd[0] != sys.executable and shutil.which(cmd[0]) is None:
            _append(results, f"-> {step.name}: skipped: {cmd[0]} not installed on this machine\n")
            return True
        try:
            res = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, timeout=max(1.0, left))
            _append(results, res.stdout[-200_000:])
            if res.returncode != 0:
                ok = False
                _append(results, f"(exit status {res.returncode})\n")
                break
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            _append(results, out[-200_000:] + f"\n(killed: over the step's {step.limit_s} s limit)\n")
            ok = False
            break
    _append(results, f"-> {step.name}: {'ok' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s\n")
    return ok


def sanitizer_workload() -> int:
    """A small workload for compute-sanitizer: every kernel of both backends once per dtype, plain and with
    a sliding window + soft-cap (the variant kernels: windowed tiles start their loads inside a chunk), and
    with fp8 caches (e4m3fn / e5m2, fp16 / bf16 q, per-KV-head scales; the CUDA tensor-core kernel's fp8
    byte staging and conversion), plain and windowed + soft-capped."""
    import torch

    import multiverse_kernels as mk
    from multiverse_kernels.backends import available_backends
    from multiverse_kernels.testing import make_inputs, random_forest

    backends = [b for b in ("triton", "cuda") if b in available_backends("tree_attention", "cuda")]
    f, groups = random_forest(3, page_size=16, max_len=40, max_nodes=6)
    meta = f.metadata(groups).to("cuda")
    for b in backends:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for d in (64, 128):
                q, k, v = make_inputs(meta, f.num_pages, 8, 2, d, dtype, device="cuda")
                mk.tree_attention(q, k, v, meta, backend=b)
                mk.tree_attention(q, k, v, meta, backend=b, window=5, softcap=4.0)
                if dtype != torch.float32:
                    sc = torch.full((2,), 0.5, device="cuda")
                    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
                        k8, v8 = (k * 2).to(fp8), (v * 2).to(fp8)
                        mk.tree_attention(q, k8, v8, meta, backend=b, k_scale=sc, v_scale=sc)
                        mk.tree_attention(q, k8, v8, meta, backend=b, k_scale=sc, v_scale=sc, window=5,
                                          softcap=4.0)
                vv = torch.randn(16, 3, 8, d, device="cuda").to(dtype)
                mk.merge_states(vv, torch.randn(16, 3, 8, device="cuda"), backend=b)
        torch.cuda.synchronize()
        print(f"sanitizer workload: backend {b} ran")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multiverse_kernels.gpu_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", action="append", help="run only this step (repeatable); default: all")
    p.add_argument("--results", default="gpu_results.txt", help="file the steps append to")
    p.add_argument("--dry-run", action="store_true", help="report every step as skipped (no GPU needed)")
    p.add_argument("--list", action="store_true", help="list the steps and their limits")
    p.add_argument("--sanitizer-workload", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.sanitizer_workload:
        return sanitizer_workload()
    all_steps = steps()
    if a.list:
        for s in all_steps:
            print(f"{s.name:<11} limit {s.limit_s:>3} s  {s.what}")
        return 0
    names = [s.name for s in all_steps]
    for n in a.step or []:
        if n not in names:
            p.error(f"--step: unknown step {n!r}; steps: {', '.join(names)}")
    chosen = [s for s in all_steps if not a.step or s.name in a.step]
    reason = "--dry-run" if a.dry_run else no_gpu_reason()
    a.results = os.path.abspath(a.results)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _append(a.results, f"\n=== multiverse_kernels GPU run {stamp} on {os.uname().nodename}: steps "
                       f"{', '.join(s.name for s in chosen)}\n")
    ok = all([run_step(s, a.results, reason) for s in chosen])
    _append(a.results, f"=== {'all steps ok' if ok else 'SOME STEPS FAILED'}"
                       f"{' (dry run: nothing ran)' if reason else ''}; results in {a.results}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
