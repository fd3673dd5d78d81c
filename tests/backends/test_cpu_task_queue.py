"""The CPU kernels' task queue (csrc/cpu/parallel.h) gives every worker a task on a step with few tasks.

A one-request decode step has one task per KV head; a queue that let the first worker claim its
look-ahead task before the second thread woke up ran such steps on one thread. The check is a small
C++ program (csrc/tools/task_queue_check.cpp) built with the system compiler and OpenMP: the queue's
logic is the same under ATen's pool (the extension) and OpenMP (the standalone library).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_worker_gets_a_task(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++ / $CXX) to build csrc/tools/task_queue_check.cpp")
    exe = tmp_path / "task_queue_check"
    subprocess.run([cxx, "-O2", "-std=c++17", "-fopenmp", f"-I{ROOT / 'csrc' / 'cpu'}",
                    str(ROOT / "csrc" / "tools" / "task_queue_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    r = subprocess.run([str(exe)], env=dict(os.environ, OMP_NUM_THREADS="2"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
