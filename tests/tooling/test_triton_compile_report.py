"""The compile report's machinery on a few configurations (the full report runs in CI, .ci/run):
an ahead-of-time compile for sm_90a / sm_100a yields a ptxas register and spill report and tensor-core
instructions, a configuration forced to spill is flagged, the KV loop of the attention kernel is
software-pipelined and no tensor-core dot is duplicated across warps (checked on the TTGIR), and the
checks themselves catch what they claim to.

The compiles run in a child process with ``TRITON_INTERPRET=0`` (this test process interprets the
kernels, tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

_PATH = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "triton_compile_report.py"


@pytest.fixture(scope="module")
def report():
    # The script sets TRITON_INTERPRET=0 for itself and its workers: import the package first (so this
    # process keeps the interpreted kernels the other test modules use) and restore the variable after.
    importlib.import_module("multiverse_kernels.backends.triton")
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        spec = importlib.util.spec_from_file_location("triton_compile_report", _PATH)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return mod


def _job(report, label_part, arch, **extra):
    for kind, label, sig, opts in report._configs():
        if label_part in label:
            return (kind, label, sig, {**opts, **extra}, arch)
    raise AssertionError(f"no configuration {label_part!r}")


def _run(tmp_path, filt, targets="90", maxnreg=0):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(_PATH), "--filter", filt, "--targets", targets, "--json", str(out),
           "--jobs", "1"]
    if maxnreg:
        cmd += ["--maxnreg", str(maxnreg)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="0"),
                         timeout=600)
    data = json.loads(out.read_text())
    assert data["results"], res.stdout + res.stderr
    return res, data


def test_compile_big_tile_both_archs(tmp_path, report):
    res, data = _run(tmp_path, "^attn d=64  fp16 BLOCK_M=64 ", targets="90,100")
    assert res.returncode == 0, res.stdout + res.stderr
    by_arch = {r["arch"]: r for r in data["results"]}
    for arch, mma in ((90, "wgmma"), (100, "tcgen05")):
        r = by_arch[arch]
        assert r["ptxas_ok"] and r["regs"] > 0 and r["spills"] == 0 and r["shared"] > 0
        assert r[mma], f"expected {mma} instructions for a 64-row tile on sm_{arch}"
        assert r["prefetch"] is True and r["want_prefetch"] and r["duplicated"] == []
        assert report.problems(r) == ""


def test_spills_are_flagged(tmp_path, report):
    res, data = _run(tmp_path, "^attn d=128 fp16 BLOCK_M=32 ", maxnreg=64)
    r = data["results"][0]
    assert res.returncode == 1 and r["spills"] > 0
    assert "SPILLS" in report.problems(r)
    assert "SHARED MEMORY" in report.problems({**r, "shared": 10 ** 6})


def test_layout_and_pipeline_checks_catch_bad_ir(report):
    """The TTGIR checks on hand-written IR: a 64-row dot on 8 warps of a Hopper layout duplicates work;
    a loop that loads its own block at the top is not pipelined."""
    mma = ("#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], "
           "instrShape = [16, 32, 16]}>\n")
    dot = ("%s = ttng.warp_group_dot %q, %k, %c {inputPrecision = 0 : i32} : !a * !b -> "
           "tensor<64x64xf32, #mma>\n")
    assert report.duplicated_mma_work(mma + dot)
    assert not report.duplicated_mma_work(mma.replace("[8, 1]", "[4, 1]") + dot)
    load = "%k = tt.load %p, %m, %o : tensor<64x128x!tt.ptr<f16>, #blocked>\n"
    loop = "%r:3 = scf.while (%a = %x) : (f32) -> f32 {\n"
    pipelined = load * 3 + loop + load + dot + "scf.yield %a\n"
    not_pipelined = load + loop + load + dot + "scf.yield %a\n"
    assert report.loop_prefetches(pipelined) and not report.loop_prefetches(not_pipelined)
    r = {"ptxas_ok": True, "spills": 0, "shared": 0, "arch": 90, "duplicated": [], "prefetch": False,
         "want_prefetch": True}
    assert "NOT PIPELINED" in report.problems(r)


def test_every_dispatchable_config_is_listed(report):
    labels = [label for _, label, _, _ in report._configs()]
    for d, bms in ((64, (16, 32, 64, 128, 256)), (128, (16, 32, 64, 128)), (256, (16,))):
        for t in ("fp16", "bf16"):
            for bm in bms:
                assert any(f"attn d={d:<3} {t} BLOCK_M={bm:<3}" in x for x in labels), (d, t, bm)


def test_backward_kernels_are_listed(report):
    labels = [label for _, label, _, _ in report._configs()]
    for kind in ("bwd_dkdv", "bwd_dq"):
        for d in (64, 128, 256):
            for t in ("fp16", "bf16"):
                assert any(x.startswith(f"{kind:<8} d={d:<3} {t} ") for x in labels), (kind, d, t)


def test_variant_configs_are_listed(report):
    """Soft-cap, window and fp8 caches (both formats) compile on representative tiles of every head_dim,
    forward and both backward kernels (docs/triton.md, "Attention variants")."""
    labels = [label for _, label, _, _ in report._configs()]
    for head in ("attn+softcap", "attn+window", "attn+fp8 kv=fp8e4nv", "bwd_dkdv+softcap", "bwd_dq+softcap",
                 "bwd_dkdv+window", "bwd_dq+window"):
        for d in (64, 128, 256):
            assert any(x.startswith(f"{head} d={d:<3} ") for x in labels), (head, d)
    assert any(x.startswith("attn+fp8 kv=fp8e5 d=64 ") for x in labels)


def test_compile_fp8_tile(tmp_path, report):
    """An fp8 (e5m2) cache on the 64-row tile: tensor-core dots on fp16 operands converted at the load,
    the KV loop still software-pipelined, no spill."""
    res, data = _run(tmp_path, r"^attn\+fp8 kv=fp8e5 d=64  fp16 BLOCK_M=64 ", targets="90")
    assert res.returncode == 0, res.stdout + res.stderr
    (r,) = data["results"]
    assert r["wgmma"] and r["prefetch"] is True and r["spills"] == 0 and report.problems(r) == ""
