"""benchmarks/load_overlap.py (the loads-vs-arithmetic measurement of docs/performance.md): the overlap
formula, the compute-only step, and a smoke run of the script on a tiny sequence (the times themselves
are measurements, not checked)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multiverse_kernels.backends import available_backends

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "load_overlap.py"


def _module():
    spec = importlib.util.spec_from_file_location("load_overlap", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_overlap_formula():
    lo = _module()
    assert lo.overlap(dram_s=3.0, compute_s=3.0, read_s=1.0) == 1.0  # the read hidden behind compute
    assert lo.overlap(dram_s=4.0, compute_s=3.0, read_s=1.0) == 0.0  # serialised
    assert lo.overlap(dram_s=5.0, compute_s=1.0, read_s=3.0) == -1.0  # slower than both in series


def test_compute_only_step_keeps_everything_but_the_pages():
    lo = _module()
    w = lo.make_step("single", torch.float32, 4, 40)
    c = lo.compute_only(w)
    assert int(c.meta.node_page_indices.abs().sum()) == 0 and int(w.meta.node_page_indices.sum()) > 0
    for f in ("node_page_indptr", "node_len", "qo_indptr", "vis_indptr", "vis_nodes"):
        assert torch.equal(getattr(c.meta, f), getattr(w.meta, f)), f
    assert c.q is w.q and c.k_cache is w.k_cache


def test_script_smoke_run(tmp_path):
    if "cpu" not in available_backends("tree_attention", "cpu"):
        pytest.skip("the C++ cpu backend is not built here (the script times it)")
    out = tmp_path / "lo.json"
    args = ["--forests", "single", "--prompt", "64", "--rounds", "2", "--iters", "1", "--json", str(out)]
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| single | fp32 |" in r.stdout
    rec = json.loads(out.read_text())["records"][0]
    assert rec["forest"] == "single" and rec["dram_ms"] > 0 and rec["compute_only_ms"] > 0
    assert rec["read_ms"] > 0
    assert len(rec["dram_round_ms"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--forests", "nope"], "--forests: unknown forest 'nope'"),
    (["--dtypes", "fp64"], "--dtypes: unknown dtype 'fp64'"),
    (["--prompt", "1024"], "--prompt: a positive token count, and only with --forests single"),
    (["--forests", "single", "--prompt", "0"], "--prompt: a positive token count"),
    (["--threads", "0"], "--threads: expected >= 1, got 0"),
    (["--rounds", "0"], "--rounds: expected >= 1, got 0"),
    (["--page-size", "-1"], "--page-size: expected >= 1, got -1"),
])
def test_script_rejects_bad_arguments(args, message):
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-1000:]
