#!/usr/bin/env python3
"""Compile the CUDA kernels with nvcc through CMake for sm_90a and sm_100a and print ptxas's report.

    python scripts/cuda_compile_report.py [--build-dir build/cuda-report] [--arch 90a --arch 100a] [-j 2]

For every kernel and architecture: registers, spill stores/loads, stack frame, static shared memory
(from ``-Xptxas -v``); plus the dynamic shared memory of each tensor-core configuration (printed by the
host tool ``multiverse_smem_report``). Also runs the standalone CPU-library smoke test that the same
CMake build produces. Exits 1 if the build fails, any kernel spills, a configuration needs more dynamic
shared memory than one block can have on sm_90 / sm_100 (227 KiB), or the smoke test fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
_DYN_SMEM = re.compile(r"^(.*) dynamic_smem_bytes=(\d+)$", re.M)
MAX_DYN_SMEM = 227 * 1024  # per block (opt-in) on sm_90 and sm_100


def demangle(names: list[str]) -> list[str]:
    exe = shutil.which("c++filt") or shutil.which("cu++filt")
    if exe is None:
        return names
    out = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True).stdout
    res = out.splitlines()
    return res if len(res) == len(names) else names


def short(name: str) -> str:
    name = re.sub(r"multiverse::cuda::\(anonymous namespace\)::", "", name)
    name = name.replace("multiverse::", "").replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return re.sub(r"\(.*\)$", "", name)


def parse(log: str) -> list[dict]:
    rows, cur = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "regs": None, "stack": 0, "spill_st": 0,
                   "spill_ld": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = (int(x) for x in m.groups())
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build", "cuda-report"))
    ap.add_argument("--arch", action="append", help="CUDA architectures (default 90a and 100a)")
    ap.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    ap.add_argument("--cuda-home", default=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    a = ap.parse_args(argv)
    archs = a.arch or ["90a", "100a"]
    nvcc = os.path.join(a.cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        print(f"cuda_compile_report: nvcc not found at {nvcc} (set CUDA_HOME)", file=sys.stderr)
        return 1
    if shutil.which("cmake") is None:
        print("cuda_compile_report: cmake not found", file=sys.stderr)
        return 1
    t0 = time.time()
    cfg = ["cmake", "-S", ROOT, "-B", a.build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DMULTIVERSE_CUDA=ON",
           "-DMULTIVERSE_PTXAS_VERBOSE=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
           f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    r = subprocess.run(cfg, capture_output=True, text=True)
    if r.returncode:
        print(r.stdout[-4000:] + r.stderr[-4000:])
        print("cuda_compile_report: cmake configure FAILED")
        return 1
    # Clean first so every kernel is recompiled and reported.
    subprocess.run(["cmake", "--build", a.build_dir, "--target", "clean"], capture_output=True)
    r = subprocess.run(["cmake", "--build", a.build_dir, "-j", str(a.jobs)], capture_output=True, text=True)
    log = r.stdout + r.stderr
    with open(os.path.join(a.build_dir, "ptxas_report.log"), "w") as f:
        f.write(log)
    if r.returncode:
        errs = [ln for ln in log.splitlines() if "error" in ln.lower()][:20]
        print("\n".join(errs) or log[-4000:])
        print(f"cuda_compile_report: build FAILED (full log: {a.build_dir}/ptxas_report.log)")
        return 1
    rows = parse(log)
    names = demangle([row["kernel"] for row in rows])
    print(f"nvcc/CMake build for {', '.join('sm_' + x for x in archs)} in {time.time() - t0:.0f} s "
          f"({a.jobs} jobs)")
    print(f"{'arch':<9}{'regs':>5}{'spill st':>9}{'spill ld':>9}{'stack':>7}{'smem':>7}  kernel")
    bad = []
    for row, name in sorted(zip(rows, names, strict=True), key=lambda x: (x[0]["arch"], short(x[1]))):
        print(f"{row['arch']:<9}{row['regs'] if row['regs'] is not None else '-':>5}{row['spill_st']:>9}"
              f"{row['spill_ld']:>9}{row['stack']:>7}{row['smem']:>7}  {short(name)}")
        if row["spill_st"] or row["spill_ld"]:
            bad.append(f"{row['arch']} {short(name)}")
    tool = os.path.join(a.build_dir, "multiverse_smem_report")
    if os.path.exists(tool):
        out = subprocess.run([tool], capture_output=True, text=True).stdout.rstrip()
        print(out)
        over = [m.group(1) for m in _DYN_SMEM.finditer(out) if int(m.group(2)) > MAX_DYN_SMEM]
        if over:
            print(f"cuda_compile_report: dynamic shared memory over {MAX_DYN_SMEM} bytes: FAILED\n  "
                  + "\n  ".join(over))
            return 1
    smoke = os.path.join(a.build_dir, "multiverse_cpu_smoke_test")  # the CPU library without torch
    if os.path.exists(smoke):
        sr = subprocess.run([smoke], capture_output=True, text=True)
        print(sr.stdout.rstrip())
        if sr.returncode:
            print("cuda_compile_report: the standalone CPU library smoke test FAILED")
            return 1
    missing = [f"sm_{x}" for x in archs if not any(row["arch"] == f"sm_{x}" for row in rows)]
    if not rows or missing:
        print(f"cuda_compile_report: no ptxas report for {missing or archs}: FAILED")
        return 1
    if bad:
        print(f"cuda_compile_report: {len(bad)} kernel(s) spill registers: FAILED\n  " + "\n  ".join(bad))
        return 1
    print(f"cuda_compile_report: {len(rows)} kernels, no spills: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
