"""benchmarks/cache_layouts.py, benchmarks/vllm_cpu_peer.py and benchmarks/call_overhead.py
(docs/performance.md's cache-layout, vLLM-peer and per-call tables): the head-major view holds the same
values, and a smoke run of each script (the
times themselves are measurements, not checked; the peer needs vLLM's CPU build: .ci/run's vLLM step
runs this file after installing it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multiverse_kernels.backends import available_backends
from multiverse_kernels.bench.workloads import head_major

ROOT = Path(__file__).resolve().parents[2]


def _needs_cpu_backend():
    if "cpu" not in available_backends("tree_attention", "cpu"):
        pytest.skip("the C++ cpu backend is not built here (the scripts time it)")


def test_head_major_view_same_values_other_strides():
    c = torch.randn(3, 4, 2, 8)
    h = head_major(c)
    assert h.shape == c.shape and torch.equal(h, c)
    assert h.stride() == (64, 8, 32, 1)  # storage [pages, Hk, page_size, D]: a head's page rows adjacent


def test_cache_layouts_smoke_run():
    _needs_cpu_backend()
    args = ["--forests", "single", "--dtypes", "float32", "--rounds", "1", "--iters", "1"]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cache_layouts.py"), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]  # (the script asserts every layout's output bitwise equal)
    row = [line for line in r.stdout.splitlines() if line.startswith("| single unshared")]
    assert len(row) == 1 and row[0].count("x |") == 2, r.stdout


def test_vllm_cpu_peer_smoke_run(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (CI's third environment has it)")
    _needs_cpu_backend()
    out = tmp_path / "peer.json"
    args = ["--forests", "single", "--dtypes", "float32", "--rounds", "1", "--iters", "1", "--out", str(out)]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm_cpu_peer.py"), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())["results"][0]
    assert rec["agree"] and rec["forest"] == "single" and rec["dtype"] == "fp32"
    for key in ("ours_ms", "ours_head_major_ms", "vllm_ms"):
        assert rec[key] > 0, key


@pytest.mark.parametrize("script, args, message", [
    ("vllm_cpu_peer.py", ["--threads", "0"], "--threads: expected >= 1, got 0"),
    ("vllm_cpu_peer.py", ["--rounds", "0"], "--rounds: expected >= 1, got 0"),
    ("vllm_cpu_peer.py", ["--page-size", "-1"], "--page-size: expected >= 1, got -1"),
    ("vllm_cpu_peer.py", ["--forests", "nope"], "--forests: unknown"),
    ("cache_layouts.py", ["--rounds", "0"], "--page-size, --rounds and --iters must be >= 1"),
    ("cache_layouts.py", ["--dtypes", "float64"], "--dtypes: unknown dtype 'float64'"),
])
def test_scripts_reject_bad_arguments(script, args, message):
    """Refused before anything runs (no vLLM needed): argparse's exit 2 naming the flag."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-1000:]


def test_call_overhead_smoke_run():
    """benchmarks/call_overhead.py (docs/performance.md's per-call and per-step costs): every row printed,
    the per-step rows (plan, block tables -> forest in C++ and torch) without an 'over the C++ op'."""
    _needs_cpu_backend()
    args = ["--tokens", "64", "--rounds", "1", "--number", "2"]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "call_overhead.py"), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| call")}
    for name in ("C++ op", "op, validate=False", "step plan (once per step)",
                 "block tables -> forest, torch (once per step)",
                 "block tables -> forest, C++ (once per step)"):
        assert name in rows, (name, r.stdout)
    assert rows["step plan (once per step)"] == "-" and rows["C++ op"] == "+0.0"
