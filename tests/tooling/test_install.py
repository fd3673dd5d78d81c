"""Installation: what `python -m multiverse_kernels.info` reports, the wheel ships the C++ sources, and
the first-use build (multiverse_kernels/_jit.py) of an install without a compiled _C (docs/build.md)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _py(code: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          cwd=cwd or ROOT, timeout=1200)


def test_info_reports_backends_isa_versions():
    r = subprocess.run([sys.executable, "-m", "multiverse_kernels.info", "--json"], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert set(info["backends"]) == {"reference", "triton", "cpu", "cuda"}
    for name, b in info["backends"].items():
        assert b["available"] or b["reason"], name  # a missing backend always says why
    assert info["backends"]["reference"]["available"]
    if os.environ.get("MULTIVERSE_REQUIRE_CPP") == "1":
        assert info["backends"]["cpu"]["available"], info["backends"]["cpu"]
    assert info["versions"]["torch"] == torch.__version__
    assert info["cpu"]["isa_level"] and info["cpu"]["kernel_isa"]
    from multiverse_kernels.info import _format

    text = _format(info)  # what the command prints without --json
    assert "backends:" in text and "ISA level" in text and "CUDA kernels built for" in text


@pytest.mark.slow
def test_wheel_ships_sources(tmp_path):
    """An install whose build environment has no torch still gets the sources to build from."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "MULTIVERSE_BUILD_CPP": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("multiverse_kernels-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    from multiverse_kernels import _build_config as cfg

    for src in cfg.CPU_SOURCES + cfg.CUDA_SOURCES:
        assert f"multiverse_kernels/_csrc/{src}" in names, src
    assert "multiverse_kernels/_csrc/csrc/include/multiverse/params.h" in names
    assert not any(n.endswith(".so") for n in names)


@pytest.mark.slow
def test_first_use_build(tmp_path):
    """Without the install-time library the first use compiles the kernels once (one line), later
    processes load the cache silently; the result matches the reference."""
    code = (
        "import torch, multiverse_kernels as mk\n"
        "from multiverse_kernels.testing import design_example_forest, make_inputs\n"
        "from multiverse_kernels._native import library_path\n"
        "f, g = design_example_forest(); m = f.metadata(g)\n"
        "q, k, v = make_inputs(m, f.num_pages)\n"
        "a = mk.tree_attention(q, k, v, m, backend='cpu')\n"
        "b = mk.tree_attention(q, k, v, m, backend='reference')\n"
        "torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)\n"
        "print('LIB', library_path('_C'))\n")
    env = {"MULTIVERSE_PREBUILT": "0", "MULTIVERSE_CACHE_DIR": str(tmp_path), "MAX_JOBS": "2"}
    first = _py(code, env)
    assert first.returncode == 0, first.stderr[-3000:]
    building = [ln for ln in first.stderr.splitlines() if "multiverse_kernels: building" in ln]
    assert len(building) == 1, first.stderr
    lib = first.stdout.split("LIB ", 1)[1].strip()
    assert lib.startswith(str(tmp_path)) and Path(lib).is_file()
    again = _py(code, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "multiverse_kernels: building" not in again.stderr
    assert again.stdout.split("LIB ", 1)[1].strip() == lib
    # MULTIVERSE_JIT=0 with nothing cached: the backend is missing and says why
    off = _py("from multiverse_kernels.backends import available_backends, _LOAD_ERRORS\n"
              "print(available_backends('tree_attention', 'cpu'), _LOAD_ERRORS.get('cpu'))",
              {**env, "MULTIVERSE_JIT": "0", "MULTIVERSE_CACHE_DIR": str(tmp_path / "empty")})
    assert off.returncode == 0, off.stderr
    backends = off.stdout.split("]", 1)[0]  # the printed list (triton is there when interpreted)
    assert "MULTIVERSE_JIT=0" in off.stdout and "'reference'" in backends and "'cpu'" not in backends
    assert "C++ CPU kernels unavailable" in off.stderr  # auto's fallback is said once


def test_no_cuda_runtime_note_on_cpu_use(tmp_path):
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." at import on a machine
    without a GPU; a CPU user of this package (first use, the bench's timer, a compile) must not see it."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: torch prints no such note")
    code = ("import torch, multiverse_kernels as mk\n"
            "from multiverse_kernels.testing import multiverse_forest, make_inputs\n"
            "f, g = multiverse_forest(); m = f.metadata(g); q, k, v = make_inputs(m, f.num_pages)\n"
            "mk.tree_attention(q, k, v, m)\n"
            "import torch.utils.cpp_extension, torch.utils.benchmark\n"
            "print('ran')\n")
    env = dict(os.environ, CUDA_HOME=str(tmp_path))  # a CUDA_HOME that exists: torch would log the note
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0 and "ran" in r.stdout, r.stderr[-2000:]
    assert "No CUDA runtime" not in r.stderr, r.stderr[-2000:]
