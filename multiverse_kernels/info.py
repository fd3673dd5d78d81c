"""What this installation can run: ``python -m multiverse_kernels.info``.

Prints the version of the package, torch, Triton, Python and the compiler; every backend with
"available" or the reason it is not (not built, build failed, no GPU, ...) and where its library
came from (install-time build or the first-use cache, multiverse_kernels/_jit.py); the CPU's ISA
level and the ISA path the C++ kernels (forward and backward) dispatch to at run time (cpuid,
capped by ``MULTIVERSE_CPU_ISA``) and the CUDA architectures the CUDA library was built for.
``--json`` prints the same as JSON. Importing the cpu backend may build it first (one line on stderr;
see docs/build.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

import torch

from . import __version__
from ._native import library_path, load_extension
from .backends import _IMPLS, _LOAD_ERRORS, BACKENDS, _load, available_backends

__all__ = ["collect", "cpu_flags", "cpu_isa", "cpu_model", "isa_runnable", "kernel_isa", "ISA_NAMES", "main"]

ISA_NAMES = ("baseline", "avx2", "avx512", "avx512_bf16", "amx", "amx_emulated")
"""The C++ CPU kernel's ISA paths by the index ``torch.ops.multiverse_C.cpu_isa`` reports. Each runs where
the widest supported path is at least it, except ``amx_emulated`` (the AMX code on a software model of
the tile instructions), which runs wherever ``avx512_bf16`` does and only when asked for: see
:func:`isa_runnable`."""


def isa_runnable(name: str, best: str) -> bool:
    """Whether ``MULTIVERSE_CPU_ISA=name`` can run where the widest supported path is ``best``."""
    if name == "amx_emulated":
        return ISA_NAMES.index(best) >= ISA_NAMES.index("avx512_bf16")
    return ISA_NAMES.index(name) <= ISA_NAMES.index(best)

# x86-64 micro-architecture levels (the psABI's): the flags /proc/cpuinfo must show for each.
_X86_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"}
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else platform.processor() or the machine type)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> dict[str, Any]:
    """The CPU, its ISA level and the variant the C++ kernel runs.

    ``kernel_isa`` comes from the extension when it reports it (``torch.ops.multiverse_C.cpu_isa``);
    otherwise it is derived from the CPU flags, which is what the kernel's cpuid dispatch selects on
    (amx: + amx_tile, amx_bf16 > avx512_bf16: v4 + the avx512_bf16 flag > avx512 ~ x86-64-v4 > avx2 ~ v3 >
    baseline).
    """
    flags = cpu_flags()
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        level = "x86-64-v4" if _X86_V4 <= flags else "x86-64-v3" if _X86_V3 <= flags else "x86-64 baseline"
    else:
        level = machine
    # (as /proc/cpuinfo spells them: avx512_bf16, avx512_fp16)
    simd = [f for f in ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "avx2",
                        "fma", "f16c", "neon", "asimd", "sve") if f in flags]
    out: dict[str, Any] = {"model": cpu_model(), "machine": machine, "isa_level": level, "simd": simd,
                           "threads": None, "kernel_isa": None, "kernel_isa_source": None}
    try:
        out["threads"] = torch.get_num_threads()
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        op = getattr(getattr(torch.ops, "multiverse_C", None), "cpu_isa", None)
        if op is not None:
            name, best = kernel_isa()  # dispatched (MULTIVERSE_CPU_ISA applied), widest supported
            out["kernel_isa"] = f"{name} (CPU supports {best})"
            out["kernel_isa_source"] = "reported by the C++ kernel"
    except Exception:  # noqa: BLE001 - info must print whatever works
        pass
    if out["kernel_isa"] is None:
        out["kernel_isa"], out["kernel_isa_source"] = level, "derived from /proc/cpuinfo flags"
    return out


def kernel_isa() -> tuple[str, str]:
    """(ISA path the C++ CPU kernel dispatches to now, widest path this CPU supports); ("-", "-") when
    the library is not built. ``MULTIVERSE_CPU_ISA=amx|avx512_bf16|avx512|avx2|baseline`` forces a
    lower one, ``amx_emulated`` the AMX code on a software model of the tiles (any avx512_bf16 CPU)."""
    try:
        load_extension("_C")
    except (ImportError, OSError, RuntimeError):
        return "-", "-"
    sel, best = torch.ops.multiverse_C.cpu_isa()
    env = os.environ.get("MULTIVERSE_CPU_ISA")
    name = ISA_NAMES[sel] if sel >= 0 else f"invalid MULTIVERSE_CPU_ISA={env}"
    return name, ISA_NAMES[best]


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx.split()[0]) is None:
        return None
    try:
        r = subprocess.run([cxx.split()[0], "--version"], capture_output=True, text=True, timeout=10)
        return r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc") or ""
    if not nvcc:
        return None
    try:
        r = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=10)
        lines = [ln for ln in r.stdout.splitlines() if "release" in ln]
        return lines[0].strip() if lines else None
    except (OSError, subprocess.SubprocessError):
        return None


def _library_info(name: str) -> dict[str, Any] | None:
    path = library_path(name)
    if path is None:
        return None
    info: dict[str, Any] = {"path": path}
    side = path + ".build.json"
    if os.path.exists(side):
        try:
            with open(side) as f:
                info.update(json.load(f))
        except (OSError, ValueError):
            pass
    return info


def collect() -> dict[str, Any]:
    """Everything ``python -m multiverse_kernels.info`` prints, as a dict."""

    _load()
    versions: dict[str, Any] = {
        "multiverse_kernels": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "compiler": _compiler(), "nvcc": _nvcc(),
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        versions["triton"] = None
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        versions["transformers"] = None

    cuda_ok = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_ok else []
    backends: dict[str, dict[str, Any]] = {}
    for b in BACKENDS:
        ops = sorted(op for op, impls in _IMPLS.items() if b in impls)
        if b in _LOAD_ERRORS:
            backends[b] = {"available": False, "reason": _LOAD_ERRORS[b]}
            continue
        if not ops:
            backends[b] = {"available": False, "reason": "registers no ops"}
            continue
        devices = sorted(set().union(*(_IMPLS[op][b][1] for op in ops)))
        entry: dict[str, Any] = {"available": True, "devices": devices, "ops": ops}
        if b == "cuda" and not cuda_ok:
            entry["note"] = "library loads, but no CUDA device is visible"
        if b == "triton" and not cuda_ok:
            entry["note"] = ("no CUDA device: runs only in the interpreter (TRITON_INTERPRET=1, "
                             "CPU tensors)")
        lib = _library_info({"cpu": "_C", "cuda": "_C_cuda"}.get(b, ""))
        if lib is not None:
            entry["library"] = lib
        backends[b] = entry
    cuda_archs = None
    cuda_lib = backends.get("cuda", {}).get("library")
    if cuda_lib is not None:
        cuda_archs = cuda_lib.get("cuda_archs")
    return {
        "versions": versions,
        "backends": backends,
        "auto": {dev: _auto(dev) for dev in ("cpu", "cuda")},
        "cpu": cpu_isa(),
        "cuda": {"available": cuda_ok, "devices": gpus, "archs_built": cuda_archs},
    }


def _auto(device: str) -> str | None:
    names = available_backends("tree_attention", device)
    return names[0] if names else None


def _format(info: dict[str, Any]) -> str:
    lines = ["multiverse_kernels " + str(info["versions"]["multiverse_kernels"])]
    v = info["versions"]
    lines.append("versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "triton", "transformers")
                                          if v.get(k)) + (f" (CUDA {v['torch_cuda']})" if v["torch_cuda"]
                                                           else " (CPU-only torch)"))
    lines.append(f"compiler: {v['compiler'] or 'none found (C++ kernels cannot be built)'}; "
                 f"nvcc: {v['nvcc'] or 'not found'}")
    c = info["cpu"]
    lines.append(f"CPU: {c['model']}, {c['threads']} threads; ISA level {c['isa_level']} "
                 f"({' '.join(c['simd']) or 'no SIMD flags read'}); C++ kernel runs {c['kernel_isa']} "
                 f"({c['kernel_isa_source']})")
    cu = info["cuda"]
    gpu = ", ".join(cu["devices"]) if cu["devices"] else "no CUDA device visible"
    lines.append(f"CUDA: {gpu}; CUDA kernels built for: {cu['archs_built'] or 'n/a (not built or unknown)'}")
    lines.append("backends:")
    for name, b in info["backends"].items():
        if b["available"]:
            extra = f" [{b['note']}]" if "note" in b else ""
            lib = b.get("library")
            src = f"; library {lib['path']}" + (f" (built {lib['built']})" if lib.get("built") else "") \
                if lib else ""
            lines.append(f"  {name:10s} available on {'/'.join(b['devices'])}{extra}{src}")
        else:
            lines.append(f"  {name:10s} missing: {b['reason']}")
    lines.append(f"backend='auto': {info['auto']['cpu']} for CPU tensors, "
                 f"{info['auto']['cuda'] or 'none'} for CUDA tensors")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multiverse_kernels.info", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    a = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if a.json else _format(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
