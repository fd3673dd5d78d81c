"""The GPU entry point (python -m multiverse_kernels.gpu_run) end to end in its dry mode, which is what a
machine without a GPU runs: every step reports "skipped: no GPU (<reason>)", appends to one results
file, and fits the lent machine's limits (each step under 8 minutes). Also the parts of the GPU timing
and the CUDA slow-path warning that need no GPU."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from multiverse_kernels.backends._cuda_align import misaligned
from multiverse_kernels.bench import gpu_run
from multiverse_kernels.bench.ncu import parse_ncu_csv

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = ["env", "build", "triton", "cuda", "graph", "vllm", "nccl", "memcheck", "racecheck", "bench",
         "bench-bf16", "ncu"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "multiverse_kernels.gpu_run", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_steps_fit_the_limits():
    steps = gpu_run.steps()
    assert [s.name for s in steps] == STEPS
    for s in steps:
        assert 0 < s.limit_s < 8 * 60, s.name
        assert s.commands, s.name


def test_cuda_step_runs_the_cuda_kernel_tests():
    """The cuda step runs every test of tests/backends/test_cuda_ops.py (``-m gpu``; its ``-k`` keeps
    all of them: none is named after triton), among them the window / soft-cap tests of both CUDA
    kernels and the load counter with a window, and the cuda cases of tests/ops/test_variants.py."""
    step = {s.name: s for s in gpu_run.steps()}["cuda"]
    cmds = [" ".join(c) for c in step.commands]
    assert any("tests/backends/test_cuda_ops.py" in c and "-m gpu " in c and "-k not triton" in c
               for c in cmds)
    assert "tests/ops/test_variants.py" in gpu_run.OP_TESTS
    assert any("tests/ops/test_variants.py" in c and c.endswith("-k cuda") for c in cmds)
    names = re.findall(r"^def (test_\w+)", (ROOT / "tests/backends/test_cuda_ops.py").read_text(), re.M)
    assert not [n for n in names if "triton" in n]
    for want in ("test_window_softcap_random_forests", "test_window_loads_only_the_window",
                 "test_softcap_saturates", "test_window_long_prefill_and_wide_tile"):
        assert want in names


def test_dry_run_end_to_end(tmp_path):
    results = tmp_path / "gpu_results.txt"
    res = _run("--dry-run", "--results", str(results))
    assert res.returncode == 0, res.stderr[-2000:]
    text = results.read_text()
    assert res.stdout.strip().endswith(text.strip()[-60:])  # what it printed is what it appended
    for name in STEPS:
        assert f"== step {name}:" in text
        assert re.search(rf"-> {re.escape(name)}: skipped: no GPU \(--dry-run\)", text), name
    assert text.count("skipped: no GPU") == len(STEPS)
    assert "dry run: nothing ran" in text
    # a second run appends to the same file
    assert _run("--dry-run", "--step", "bench", "--results", str(results)).returncode == 0
    assert results.read_text().count("skipped: no GPU") == len(STEPS) + 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the steps would run")
def test_no_gpu_is_detected_without_dry_run(tmp_path):
    results = tmp_path / "r.txt"
    res = _run("--step", "env", "--step", "triton", "--results", str(results))
    assert res.returncode == 0, res.stderr[-2000:]
    text = results.read_text()
    assert text.count("skipped: no GPU (") == 2
    assert gpu_run.no_gpu_reason() in text


def test_list_and_bad_step():
    res = _run("--list")
    assert res.returncode == 0 and all(name in res.stdout for name in STEPS)
    res = _run("--step", "nope", "--dry-run")
    assert res.returncode != 0 and "unknown step" in res.stderr


def test_parse_ncu_csv():
    text = ('==PROF== Connected to process 1\n'
            '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
            '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n'
            '"0","1","python","h","_tree_attn_kernel","1","7","(128, 1, 1)","(10, 8, 1)","0","9.0",'
            '"Command line profiler metrics","dram__bytes_read.sum","byte","1,048,576"\n'
            '"1","1","python","h","_merge_kernel","1","7","(64, 1, 1)","(9, 32, 1)","0","9.0",'
            '"Command line profiler metrics","dram__bytes_read.sum","byte","4096"\n'
            '"1","1","python","h","_merge_kernel","1","7","(64, 1, 1)","(9, 32, 1)","0","9.0",'
            '"Command line profiler metrics","dram__bytes_write.sum","byte","99"\n')
    assert parse_ncu_csv(text) == 1_048_576 + 4096


def test_misaligned_stride_reason():
    """The predicate behind the CUDA backend's one-time slow-path warning (checked on CPU tensors)."""
    q = torch.zeros(5, 4, 64, dtype=torch.float16)
    k = torch.zeros(3, 16, 2, 64, dtype=torch.float16)
    assert misaligned(q, k, k) is None
    odd = torch.zeros(5, 4, 68, dtype=torch.float16)[..., :64]  # head stride 68
    assert "q strides" in misaligned(odd, k, k)
    assert misaligned(odd.float(), k.float(), k.float()) is None  # fp32 always runs the scalar kernel
    shifted = torch.zeros(3 * 16 * 2 * 64 + 1, dtype=torch.float16)[1:].view(3, 16, 2, 64)
    assert "k_cache.data_ptr()" in misaligned(q, shifted, k)
    # fp8 caches: 16-byte strides are 16 elements (a head stride of 72 bytes is not)
    k8 = torch.zeros(3, 16, 2, 64, dtype=torch.float8_e4m3fn)
    assert misaligned(q, k8, k8) is None
    odd8 = torch.zeros(3, 16, 2, 72, dtype=torch.float8_e5m2)[..., :64]
    assert "k_cache strides (2304, 144, 72) are not multiples of 16 elements" in misaligned(q, odd8, k8)
