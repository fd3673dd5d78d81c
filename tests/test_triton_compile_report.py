"""The compile report's machinery on a few configurations (the full report runs in CI, .ci/run):
an ahead-of-time compile for sm_90a / sm_100a yields a ptxas register and spill report and tensor-core
instructions, and a configuration forced to spill is flagged."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytest.importorskip("triton", reason="triton is not installed")

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "triton_compile_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("triton_compile_report", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _job(report, label_part, arch, **extra):
    for kind, label, sig, opts in report._configs():
        if label_part in label:
            return (kind, label, sig, {**opts, **extra}, arch)
    raise AssertionError(f"no configuration {label_part!r}")


@pytest.mark.parametrize("arch,mma", [(90, "wgmma"), (100, "tcgen05")])
def test_compile_big_tile(report, arch, mma):
    r = report._compile(_job(report, "attn d=64  fp16 BLOCK_M=64 ", arch))
    assert r["ptxas_ok"] and r["regs"] > 0 and r["spills"] == 0 and r["shared"] > 0
    assert r[mma], f"expected {mma} instructions for a 64-row tile on sm_{arch}"
    assert report.problems(r) == ""


def test_spills_are_flagged(report):
    r = report._compile(_job(report, "attn d=128 fp16 BLOCK_M=32 ", 90, maxnreg=64))
    assert r["spills"] > 0
    assert "SPILLS" in report.problems(r)
    assert "SHARED MEMORY" in report.problems({**r, "shared": 10 ** 6})


def test_every_dispatchable_config_is_listed(report):
    labels = [label for _, label, _, _ in report._configs()]
    for d, bms in ((64, (16, 32, 64, 128, 256)), (128, (16, 32, 64, 128)), (256, (16, 32))):
        for t in ("fp16", "bf16"):
            for bm in bms:
                assert any(f"attn d={d:<3} {t} BLOCK_M={bm:<3}" in x for x in labels), (d, t, bm)


def test_backward_kernels_are_listed(report):
    labels = [label for _, label, _, _ in report._configs()]
    for kind in ("bwd_dkdv", "bwd_dq"):
        for d in (64, 128, 256):
            for t in ("fp16", "bf16"):
                assert any(x.startswith(f"{kind:<8} d={d:<3} {t} ") for x in labels), (kind, d, t)
