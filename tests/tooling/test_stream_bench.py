"""csrc/tools/stream_bench.cpp (the KV read-pattern microbenchmark of docs/performance.md) builds and runs,
with 4 KiB pages and with its ``huge`` argument (2 MiB transparent huge pages).

A smoke run on a tiny buffer: it must print every pattern's line; the rates themselves are not checked
(they are measurements, docs/performance.md has them with the machine named).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_stream_bench_builds_and_prints_every_pattern(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++ / $CXX) to build csrc/tools/stream_bench.cpp")
    if "avx2" not in Path("/proc/cpuinfo").read_text(errors="ignore"):
        pytest.skip("stream_bench.cpp uses AVX2 loads; this CPU has no avx2")
    exe = tmp_path / "stream_bench"
    src = ROOT / "csrc" / "tools" / "stream_bench.cpp"
    subprocess.run([cxx, "-O2", "-std=c++17", "-mavx2", "-fopenmp", str(src), "-o", str(exe)], check=True,
                   capture_output=True, text=True)
    r = subprocess.run([str(exe), "256", "4", "512"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for pattern in ("contiguous", "strided rows, prefetch 0 rows ahead",
                    "strided rows, prefetch 32 rows ahead", "head-major rows, prefetch 0 rows ahead",
                    "strided, 2 heads per task", "strided, 4 heads per task"):
        assert pattern in r.stdout, r.stdout
    assert "4 KiB pages" in r.stdout, r.stdout
    # "huge": the buffer on 2 MiB transparent huge pages (madvise); the same patterns
    r = subprocess.run([str(exe), "256", "4", "512", "huge"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "2 MiB (THP) pages" in r.stdout and "head-major rows, prefetch 8 rows ahead" in r.stdout, r.stdout
