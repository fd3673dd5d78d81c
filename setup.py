"""Build script: the pure-Python package plus, when possible, the C++/CUDA extension (docs/build.md).

Parts and how they are chosen:

* ``multiverse_kernels._C``      CPU kernels + torch.ops.multiverse_C schemas. Built when torch is
  importable at build time (``pip install --no-build-isolation .``) and a C++ compiler works.
  Otherwise (pip's default isolated build has no torch) the wheel ships the C++ sources as
  ``multiverse_kernels/_csrc/`` and the first use builds them against the installed torch
  (multiverse_kernels/_jit.py, cached per user).
* ``multiverse_kernels._C_cuda`` CUDA kernels (sm_90a, sm_100a by default). Built when additionally
  torch is a CUDA build and nvcc is found (CUDA_HOME, default /usr/local/cuda).

Environment variables:

* ``MULTIVERSE_BUILD_CPP=0``   skip all C++ (pure Python: reference + Triton backends).
* ``MULTIVERSE_BUILD_CUDA=0|1`` force the CUDA part off / on (on: a missing toolchain is an error);
  unset = build it when possible.
* ``MULTIVERSE_BUILD_STRICT=1`` a failing compile is an error (default: report one line, keep going).
* ``TORCH_CUDA_ARCH_LIST`` (default ``9.0a;10.0a;8.0+PTX``: SASS for H100/H200 and B200, plus sm_80 SASS
  and compute_80 PTX that the driver JIT-compiles on any other GPU from sm_80 on), ``MAX_JOBS``
  (parallel compile jobs), ``CUDA_HOME``.

A part that is skipped or fails is reported in ONE line starting with ``multiverse_kernels:``; the
compiler's output goes to ``build/multiverse_<part>.log``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
LOG_DIR = os.path.join(ROOT, "build")


def _load_build_config():
    # Sources and flags shared with the first-use build (multiverse_kernels/_jit.py); loaded by path
    # because the package (and torch) may not be importable here.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_multiverse_build_config", os.path.join(ROOT, "multiverse_kernels", "_build_config.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CFG = _load_build_config()


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the wheel as multiverse_kernels/_csrc/csrc/ so that an install without a
    compiled _C (isolated build, no torch) can build the kernels on first use. Not for editable
    installs: those find csrc/ in the source tree."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src_root = os.path.join(ROOT, "csrc")
        dst_root = os.path.join(self.build_lib, "multiverse_kernels", "_csrc", "csrc")
        for dirpath, dirnames, filenames in os.walk(src_root):
            dirnames[:] = [d for d in dirnames if d != "tools"]
            for fn in filenames:
                if fn.endswith(CFG.SOURCE_SUFFIXES):
                    rel = os.path.relpath(os.path.join(dirpath, fn), src_root)
                    os.makedirs(os.path.dirname(os.path.join(dst_root, rel)), exist_ok=True)
                    self.copy_file(os.path.join(dirpath, fn), os.path.join(dst_root, rel))


# pip runs setup.py for metadata first and then for the build: report only in the build run.
_METADATA_ONLY = any(a in sys.argv for a in ("egg_info", "dist_info", "sdist", "--version"))


def _note(msg: str) -> None:
    # One line on stderr (pip shows it with -v; the reason also lands in build/multiverse_build.txt).
    if _METADATA_ONLY:
        return
    line = f"multiverse_kernels: {msg}"
    print(line, file=sys.stderr, flush=True)
    try:
        os.makedirs(LOG_DIR, exist_ok=True)
        with open(os.path.join(LOG_DIR, "multiverse_build.txt"), "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


def _flag(name: str) -> str | None:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    v = v.strip().lower()
    if v in ("0", "off", "false", "no"):
        return "0"
    if v in ("1", "on", "true", "yes"):
        return "1"
    raise SystemExit(f"multiverse_kernels: {name}={os.environ[name]!r}: expected 0 or 1")


def _cxx_works() -> bool:
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    exe = cxx.split()[0]
    if shutil.which(exe) is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        r = subprocess.run([exe, src, "-o", os.path.join(d, "t")], capture_output=True)
        return r.returncode == 0


def _cu13_include() -> list[str]:
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return []
    out = []
    for base in getattr(nvidia, "__path__", []):
        inc = os.path.join(base, "cu13", "include")
        if os.path.isdir(inc):
            out.append(inc)
    return out


def _extensions() -> tuple[list, dict]:
    if _flag("MULTIVERSE_BUILD_CPP") == "0":
        _note("C++/CUDA extension not compiled now (MULTIVERSE_BUILD_CPP=0); the first use of the cpu "
              "backend builds it (MULTIVERSE_JIT=0 turns that off too)")
        return [], {}
    want_cuda = _flag("MULTIVERSE_BUILD_CUDA")
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # torch would otherwise guess from `which nvcc`
    import logging

    # torch warns "No CUDA runtime is found" on a GPU-less build machine: expected here, not news.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if want_cuda == "1":
            raise SystemExit("multiverse_kernels: MULTIVERSE_BUILD_CUDA=1 but torch is not importable at "
                             "build time (use pip install --no-build-isolation)") from None
        _note("C++/CUDA extension not compiled now (torch not importable in the build environment); "
              "the first use builds it against the installed torch, once, cached (docs/build.md)")
        return [], {}
    if not _cxx_works():
        if want_cuda == "1":
            raise SystemExit("multiverse_kernels: MULTIVERSE_BUILD_CUDA=1 but no working C++ compiler")
        _note("C++/CUDA extension skipped (no working C++ compiler); pure Python (reference, triton) "
              "unless a compiler is there at first use")
        return [], {}

    inc = [os.path.join(ROOT, d) for d in CFG.INCLUDE_DIRS]
    exts = [
        cpp_extension.CppExtension(
            "multiverse_kernels._C",
            sources=list(CFG.CPU_SOURCES),
            include_dirs=inc,
            extra_compile_args={"cxx": list(CFG.CPU_CXX_FLAGS)},
            extra_link_args=list(CFG.CPU_LINK_FLAGS),
        )
    ]

    cuda_reason = None
    if want_cuda == "0":
        cuda_reason = "MULTIVERSE_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        cuda_reason = "torch is a CPU-only build"
    elif cpp_extension.CUDA_HOME is None or not os.path.exists(
            os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        cuda_reason = "nvcc not found (set CUDA_HOME)"
    if cuda_reason is not None:
        if want_cuda == "1":
            raise SystemExit(f"multiverse_kernels: MULTIVERSE_BUILD_CUDA=1 but {cuda_reason}")
        _note(f"CUDA extension skipped ({cuda_reason}); CPU extension only")
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CFG.DEFAULT_CUDA_ARCHS)
        exts.append(
            cpp_extension.CUDAExtension(
                "multiverse_kernels._C_cuda",
                sources=list(CFG.CUDA_SOURCES),
                include_dirs=inc + _cu13_include(),
                extra_compile_args={"cxx": list(CFG.CUDA_CXX_FLAGS), "nvcc": list(CFG.CUDA_NVCC_FLAGS)},
            )
        )
    return exts, {"build_ext": _make_build_ext(cpp_extension.BuildExtension)}


def _write_build_info(lib_path: str, part: str) -> None:
    # What `python -m multiverse_kernels.info` reports about this library (torch, CUDA archs).
    import json

    import torch

    info = {"built": "at install time (setup.py)", "torch": torch.__version__,
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if part == "_C_cuda" else None}
    try:
        with open(lib_path + ".build.json", "w") as f:
            json.dump(info, f)
    except OSError:
        pass


def _make_build_ext(base: type) -> type:
    class QuietBuildExt(base):  # type: ignore[misc, valid-type]
        """Builds each extension with its compiler output in build/multiverse_<ext>.log; a failure is
        one line (or an error with MULTIVERSE_BUILD_STRICT=1 / a forced CUDA build)."""

        def build_extension(self, ext) -> None:  # noqa: ANN001
            part = ext.name.rsplit(".", 1)[-1]
            os.makedirs(LOG_DIR, exist_ok=True)
            log = os.path.join(LOG_DIR, f"multiverse{part}.log")
            strict = _flag("MULTIVERSE_BUILD_STRICT") == "1" or (
                part == "_C_cuda" and _flag("MULTIVERSE_BUILD_CUDA") == "1")
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            with open(log, "w") as f:
                os.dup2(f.fileno(), 1)
                os.dup2(f.fileno(), 2)
                try:
                    super().build_extension(ext)
                    err = None
                except Exception as e:  # compiler/linker failure
                    err = e
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
                    os.close(saved[0])
                    os.close(saved[1])
            if err is None:
                _note(f"built {ext.name} (log: {os.path.relpath(log, ROOT)})")
                _write_build_info(self.get_ext_fullpath(ext.name), part)
                return
            if strict:
                raise SystemExit(f"multiverse_kernels: building {ext.name} failed: {err} "
                                 f"(compiler output: {log})")
            _note(f"{ext.name} skipped: compile failed ({type(err).__name__}); compiler output in {log}")

        def copy_extensions_to_source(self) -> None:
            # In-place builds (editable installs, build_ext --inplace) copy the library into the
            # package; the build-info file beside it goes along.
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                try:
                    inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                except AttributeError:  # older setuptools
                    return
                if os.path.exists(regular_file + ".build.json"):
                    shutil.copyfile(regular_file + ".build.json", inplace_file + ".build.json")

    return QuietBuildExt


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
