"""Build the C++ kernels on first use when no prebuilt library is installed (docs/build.md).

``pip install .`` in pip's default isolated build environment has no torch to compile against, so the
wheel ships the C++ sources (``multiverse_kernels/_csrc/``) instead of ``_C``. The first time a
compiled backend is asked for, :func:`build_and_load` compiles them against the *installed* torch with
:func:`torch.utils.cpp_extension.load` into a cache directory keyed by the sources, the flags, the torch
version and the Python ABI, prints one line while it does, and loads the result; later processes load
the cached library at once. A file lock makes concurrent first imports build once.

Environment: ``MULTIVERSE_JIT=0`` never builds (the backend is then unavailable, with that reason);
``MULTIVERSE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/multiverse_kernels`` or
``~/.cache/multiverse_kernels``); ``MAX_JOBS`` (parallel compile jobs); ``TORCH_CUDA_ARCH_LIST`` for the
CUDA part (default: the arch of the visible GPU; the CUDA part is built at first use only when a GPU is
visible).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from . import _build_config as cfg

__all__ = ["source_root", "cache_root", "build_and_load", "jit_enabled", "cached_library"]


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." record: torch.utils.cpp_extension logs
    it at import on any machine without a GPU that has a CUDA toolkit (or CUDA_HOME set), and it is
    imported by the first-use build, torch.utils.benchmark and torch.compile. On a CPU machine that is
    expected, not a problem; every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


_CPP_EXT_LOG = logging.getLogger("torch.utils.cpp_extension")
if not any(isinstance(f, _NoCudaRuntimeNote) for f in _CPP_EXT_LOG.filters):
    _CPP_EXT_LOG.addFilter(_NoCudaRuntimeNote())

_PKG_DIR = Path(__file__).resolve().parent
# name of the part -> (library name, sources, cxx flags, ldflags, nvcc flags)
_PARTS = {
    "_C": ("multiverse_C", cfg.CPU_SOURCES, cfg.CPU_CXX_FLAGS, cfg.CPU_LINK_FLAGS, ()),
    "_C_cuda": ("multiverse_C_cuda", cfg.CUDA_SOURCES, cfg.CUDA_CXX_FLAGS, (), cfg.CUDA_NVCC_FLAGS),
}


def jit_enabled() -> bool:
    """False when ``MULTIVERSE_JIT=0`` (never compile at run time)."""
    return os.environ.get("MULTIVERSE_JIT", "1").strip().lower() not in ("0", "off", "false", "no")


def source_root() -> Path | None:
    """The directory holding ``csrc/``: the wheel's ``_csrc`` or the source tree (editable install)."""
    for root in (_PKG_DIR / "_csrc", _PKG_DIR.parent):
        if (root / cfg.CPU_SOURCES[0]).is_file():
            return root
    return None


def cache_root() -> Path:
    """Where built libraries are cached (``MULTIVERSE_CACHE_DIR`` or the user cache directory)."""
    env = os.environ.get("MULTIVERSE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "multiverse_kernels"


def _cuda_arch_list() -> str:
    import torch

    if not torch.cuda.is_available():  # nothing would run it: never compile CUDA for nothing
        raise RuntimeError("no CUDA device visible, so the CUDA kernels are not built at first use")
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(f"the CUDA kernels need sm_80 or newer, the GPU is sm_{major}{minor}")
    # sm_90a / sm_100a: the arch-specific targets the kernels are tuned and compile-checked for.
    return f"{major}.{minor}{'a' if major in (9, 10) else ''}"


def _key(part: str, root: Path, arch: str) -> str:
    import torch

    _, sources, cxx, ld, nvcc = _PARTS[part]
    h = hashlib.sha256()
    for rel in sorted(_all_sources(root)):
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    h.update(repr((sources, cxx, ld, nvcc, arch, torch.__version__, torch.version.cuda,
                   sysconfig.get_config_var("SOABI"), sys.platform)).encode())
    abi = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return f"{part.strip('_')}-torch{torch.__version__.replace('+', '_')}-{abi}-{h.hexdigest()[:16]}"


def _all_sources(root: Path) -> list[str]:
    out = []
    for p in (root / "csrc").rglob("*"):
        if p.suffix in cfg.SOURCE_SUFFIXES and p.is_file() and "tools" not in p.relative_to(root).parts:
            out.append(p.relative_to(root).as_posix())
    return out


def cached_library(part: str) -> Path | None:
    """The cached library for ``part`` ("_C" / "_C_cuda") built from the current sources, if any."""
    root = source_root()
    if root is None:
        return None
    try:
        arch = _cuda_arch_list() if part == "_C_cuda" else ""
    except RuntimeError:
        return None
    lib = cache_root() / _key(part, root, arch) / f"{_PARTS[part][0]}.so"
    return lib if lib.is_file() else None


def _ensure_ninja() -> None:
    """torch.utils.cpp_extension runs ``ninja``: make the pip-installed one (dependency) findable."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-not-found]

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "")
    missing = [d for d in dirs if d and d not in path.split(os.pathsep)]
    if missing:
        os.environ["PATH"] = os.pathsep.join(missing + ([path] if path else []))
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja not found (pip install ninja)")


def build_and_load(part: str, why: str) -> Path:
    """Compile ``part`` ("_C" or "_C_cuda") against the installed torch (once; cached) and load it
    with ``torch.ops.load_library``. ``why``: the reason no prebuilt library was used (for the message).

    Returns the library path. Raises RuntimeError with the reason when it cannot build.
    """
    import torch

    if not jit_enabled():
        raise RuntimeError(f"{why}; building it at first use is off (MULTIVERSE_JIT=0)")
    root = source_root()
    if root is None:
        raise RuntimeError(f"{why}; no C++ sources shipped to build it from")
    arch = _cuda_arch_list() if part == "_C_cuda" else ""
    lib_name, sources, cxx, ld, nvcc = _PARTS[part]
    build_dir = cache_root() / _key(part, root, arch)
    lib = build_dir / f"{lib_name}.so"
    if not lib.is_file():
        from filelock import FileLock  # a torch dependency

        build_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(build_dir / "build.lock")):
            if not lib.is_file():  # another process may have built it while we waited
                _compile(part, root, build_dir, arch, lib_name, sources, cxx, ld, nvcc)
    torch.ops.load_library(str(lib))
    return lib


def _compile(part: str, root: Path, build_dir: Path, arch: str, lib_name: str, sources, cxx, ld,
             nvcc) -> None:
    import torch
    from torch.utils import cpp_extension  # its "No CUDA runtime" note is filtered (above)

    what = "CUDA kernels (sm " + arch + ")" if part == "_C_cuda" else "C++ CPU kernels"
    print(f"multiverse_kernels: building the {what} for torch {torch.__version__} (first use only, "
          f"a minute or more; cached in {build_dir})", file=sys.stderr, flush=True)
    _ensure_ninja()
    saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    extra_inc = [str(root / d) for d in cfg.INCLUDE_DIRS]
    if part == "_C_cuda":
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        extra_inc += _cu13_include()
    log = build_dir / "build.log"
    try:
        # Compiler output goes to build.log, not the terminal (one line above is all a user sees).
        with open(log, "w") as f:
            fd_out, fd_err = os.dup(1), os.dup(2)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                cpp_extension.load(
                    name=lib_name, sources=[str(root / s) for s in sources],
                    extra_cflags=list(cxx), extra_cuda_cflags=list(nvcc) or None,
                    extra_ldflags=list(ld), extra_include_paths=extra_inc,
                    build_directory=str(build_dir), verbose=True, is_python_module=False)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(fd_out, 1)
                os.dup2(fd_err, 2)
                os.close(fd_out)
                os.close(fd_err)
    except Exception as e:
        raise RuntimeError(f"building multiverse_kernels.{part} failed ({type(e).__name__}); compiler "
                           f"output in {log}") from e
    finally:
        if part == "_C_cuda":
            if saved_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch
    import json

    with open(build_dir / f"{lib_name}.so.build.json", "w") as f:
        json.dump({"built": "at first use (multiverse_kernels/_jit.py)", "torch": torch.__version__,
                   "cuda_archs": arch or None}, f)
    # cpp_extension.load(is_python_module=False) has loaded the library; build_and_load's
    # torch.ops.load_library of the same path is then a no-op dlopen (no second registration).


def _cu13_include() -> list[str]:
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return []
    return [os.path.join(b, "cu13", "include") for b in getattr(nvidia, "__path__", [])
            if os.path.isdir(os.path.join(b, "cu13", "include"))]
