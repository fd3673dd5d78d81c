"""The main job (python -m multiverse_kernels.bench) runs and reads as documented, and its byte tally
measures what the code reads."""

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.bench import peers, report, timing
from multiverse_kernels.bench.workloads import Workload
from multiverse_kernels.testing import make_inputs, multiverse_forest, sampling_forest


def test_cache_read_counter_counts_gathers_and_full_reads():
    k = torch.randn(10, 4, 2, 8)
    v = torch.randn(10, 4, 2, 8)
    with peers.CacheReadCounter(k, v) as c:
        k.view(-1, 2, 8)[torch.tensor([1, 2, 3])]  # 3 tokens x 2 heads x 8 x 4 bytes
        _ = v.reshape(40, 16)  # a view reads nothing
        v.sum()  # a full read
    assert c.bytes == 3 * 2 * 8 * 4 + v.numel() * 4


def _workload(shape=sampling_forest, **kw):
    f, groups = shape(**kw)
    m = f.metadata(groups)
    q, k, v = make_inputs(m, f.num_pages)
    return Workload("t", f, m, q, k, v)


def test_reference_reads_per_branch_and_dense_reads_once():
    w = _workload(prompt=32, samples=4, gen_len=4, page_size=4)
    q, k, v, m = w.q, w.k_cache, w.v_cache, w.meta
    per_tok = 2 * 2 * 64 * 4
    assert w.unique_kv_bytes == (32 + 4 * 4) * per_tok
    impl = mk.backends.resolve("tree_attention", "reference", q.device)
    ref = peers.measure_bytes(lambda: impl(q, k, v, m, 0.125), w)
    assert ref == 4 * (32 + 4) * per_tok  # every sample re-reads the prompt
    dense = peers.dense_sdpa_peer(w)
    assert peers.measure_bytes(dense, w) == w.unique_kv_bytes
    expect = mk.tree_attention(q, k, v, m)
    torch.testing.assert_close(dense(), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(peers.per_branch_peer(w)(), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_flex_peer_matches_reference():
    w = _workload(multiverse_forest, prefix=40, paths=3, path_len=7, concl_len=5, page_size=4, concl_q=3)
    torch.testing.assert_close(peers.flex_peer(w)(), mk.tree_attention(w.q, w.k_cache, w.v_cache, w.meta),
                               atol=1e-5, rtol=1e-5)


@pytest.fixture
def small_forests(monkeypatch):
    """The main job on small forests and heads (the real ones take a minute)."""
    from multiverse_kernels.bench import workloads

    small = {"multiverse": ("small Multiverse", lambda ps: workloads.multiverse_forest(64, 3, 16, 4,
                                                                                      page_size=ps)),
             "sampling16": ("small sampling", lambda ps: workloads.sampling_forest(64, 4, 8, page_size=ps))}
    monkeypatch.setattr(workloads, "BENCH_FORESTS", small)
    monkeypatch.setattr(report, "BENCH_FORESTS", small)
    monkeypatch.setattr(workloads, "BENCH_HEADS", (4, 2, 64))
    monkeypatch.setattr(report, "make_workload", lambda name, dev, dt: workloads.make_workload(
        name, dev, dt, hq=4, hk=2, d=64))


def test_main_job_prints_tables_legend_and_headline(capsys, small_forests):
    """A small main job: the detail table, the summary in the README's layout, the legend (every
    column named in a table is explained), and the headline as the last line."""
    argv = ["--iters", "2", "--rounds", "2", "--no-progress"]
    assert report.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("tree_attention[") and "x on multiverse" in lines[-1]
    assert "about" in lines[2] and "min" in lines[2]  # the duration, up front
    assert "tree_attention[reference]" not in out  # the spec is timed only on request
    header = next(ln for ln in lines if ln.startswith("| method |"))
    for col in [c.strip() for c in header.strip("|").split("|")][1:-1]:
        assert col in report.LEGEND, col
    summary = next(ln for ln in lines if ln.startswith("| forest | dtype |"))
    assert "vs best peer" in summary and "per-branch decode" in summary
    assert sum(ln.startswith("| small ") for ln in lines) == 2
    # the honest roofline's header: a peak per ISA path and per GEMM dtype, the kernel's path per dtype
    peaks = next(ln for ln in lines if ln.startswith("CPU peaks"))
    assert all(k in peaks for k in ("fma baseline", "gemm fp32", "gemm bf16", "matrix units"))
    assert any(ln.startswith("cpu kernel paths: fp32 -> ") for ln in lines)


def test_main_job_reference_on_request(capsys, small_forests):
    assert report.main(["--forest", "multiverse", "--iters", "1", "--rounds", "1", "--backend", "reference",
                        "--no-peers", "--no-progress"]) == 0
    assert "| tree_attention[reference] |" in capsys.readouterr().out


def test_main_job_head_major_caches(capsys, small_forests, monkeypatch):
    """--kv-layout head-major: the backends read head-major caches (the same values; the peers keep the
    token-major ones), named in the header; a bad layout is refused."""
    seen = []
    orig = report.methods

    def spy(w, backends, peers=tuple(report.PEERS)):
        if backends:
            seen.append(w.k_cache.stride())
        return orig(w, backends, peers)

    monkeypatch.setattr(report, "methods", spy)
    assert report.main(["--forest", "multiverse", "--iters", "1", "--rounds", "1", "--no-progress",
                        "--kv-layout", "head-major"]) == 0
    out = capsys.readouterr().out
    assert "(head-major caches)" in out and "| tree_attention[" in out
    page_size, hk, d = 16, 2, 64  # the small forests' caches: [pages, 16, 2, 64]
    assert seen == [(hk * page_size * d, d, page_size * d, 1)]
    with pytest.raises(ValueError, match="kv_layout"):
        report.run_bench("multiverse", "cpu", torch.float32, 1, ["reference"], [], 1, kv_layout="HND")
    with pytest.raises(SystemExit):  # the sweeps would silently time token-major caches
        report.main(["--forest", "none", "--kv-layout", "head-major", "--sweep", "readers"])
    err = capsys.readouterr().err
    assert "--kv-layout head-major: the sweeps (--sweep) time token-major caches only" in err


def test_sweep_json_and_plots(tmp_path, capsys):
    """--sweep writes every method's time and KV bytes per point (JSON) and the PNG plots."""
    import json

    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    argv = ["--forest", "none", "--sweep", "all", "--sweep-readers", "1,4", "--sweep-prompts", "32,64",
            "--sweep-fixed-prompt", "32", "--sweep-fixed-readers", "2", "--sweep-budget", "0.01",
            "--iters", "2", "--no-progress", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path)]
    assert report.main(argv) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["machine"]["threads"] >= 1 and "--sweep" in rep["command"]
    kinds = {s["kind"]: s for s in rep["sweeps"]}
    assert set(kinds) == {"readers", "prompt"}
    assert [p["readers"] for p in kinds["readers"]["points"]] == [1, 4]
    assert [p["prompt"] for p in kinds["prompt"]["points"]] == [32, 64]
    for s in rep["sweeps"]:
        for p in s["points"]:
            ms = p["methods"]
            assert {"dense-mask SDPA", "per-branch paged decode"} <= set(ms)
            assert any(m.startswith("tree_attention[") for m in ms)
            for name, r in ms.items():
                assert r["seconds"] > 0 and r["kv_bytes"] > 0, name
            # the forest is read once by the tree kernels and dense SDPA; per branch it is re-read
            assert ms["dense-mask SDPA"]["kv_bytes"] == p["unique_kv_bytes"]
            if p["readers"] > 1:
                assert ms["per-branch paged decode"]["kv_bytes"] > p["unique_kv_bytes"]
    for kind in ("readers", "prompt"):
        png = tmp_path / f"sweep_{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sweep readers" in capsys.readouterr().out


def test_cpu_timer_flushes_the_caches_before_each_call(monkeypatch):
    calls = []
    monkeypatch.setattr(timing, "flush_caches", lambda dev: calls.append(("flush", torch.device(dev).type)))
    timing.time_fn(lambda: calls.append("call"), torch.device("cpu"), iters=3, warmup=1)
    assert calls == ["call"] + [("flush", "cpu"), "call"] * 3  # warmup unflushed, every timed call flushed
    calls.clear()
    timing.time_fn(lambda: calls.append("call"), torch.device("cpu"), iters=2, warmup=0, flush=False)
    assert calls == ["call", "call"]
    assert timing.flush_bytes(torch.device("cpu")) >= 128 << 20  # several times a last-level cache


def test_cpu_step_parts_script_runs():
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("multiverse_kernels.backends.cpu", reason="the C++ CPU extension is not built")
    script = Path(__file__).resolve().parents[2] / "scripts" / "cpu_step_parts.py"
    out = subprocess.run([sys.executable, str(script), "--part", "paths", "--iters", "1"], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("paths")]
    assert rows and rows[0][1] == "1"  # 1 thread first, then all threads (when more than 1)
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_cpu_step_parts_prefix_l2_repeats_two_pages_with_the_same_flops():
    import importlib.util
    from pathlib import Path

    from multiverse_kernels.bench.roofline import step_flops

    path = Path(__file__).resolve().parents[2] / "scripts" / "cpu_step_parts.py"
    spec = importlib.util.spec_from_file_location("cpu_step_parts", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hot, cold = mod.workload("prefix-l2", torch.float32), mod.workload("prefix", torch.float32)
    a, b = int(hot.meta.node_page_indptr[0]), int(hot.meta.node_page_indptr[1])
    assert b - a == 4096 // mod.PAGE
    assert hot.meta.node_page_indices[a:b].unique().numel() == 2
    assert torch.equal(hot.meta.node_len, cold.meta.node_len)
    assert step_flops(hot.meta, mod.HQ, mod.HK, mod.D) == step_flops(cold.meta, mod.HQ, mod.HK, mod.D)


@pytest.mark.parametrize("kind", ["window", "fp8"])
def test_variant_peers_compute_the_variant(kind):
    """The main job's variant forests: every peer computes what tree_attention computes (a peer that
    dropped the window or the fp8 scales would look faster and be wrong)."""
    from multiverse_kernels.bench import workloads

    f, groups = workloads.multiverse_forest(48, 3, 20, 6, page_size=4, concl_q=2)
    w = workloads.workload_from_forest(kind, f, groups, "cpu", torch.float32, hq=4, hk=2, d=16)
    if kind == "window":
        w.variant = {"window": 9}
        assert w.unique_kv_bytes < workloads.workload_from_forest("x", f, groups, "cpu", torch.float32, hq=4,
                                                                  hk=2, d=16).unique_kv_bytes
        tol = dict(atol=1e-5, rtol=1e-5)
    else:
        ks, vs = torch.rand(2) + 0.5, torch.rand(2) + 0.5
        w.q = w.q.bfloat16()
        w.k_cache = (w.k_cache / ks[:, None]).to(torch.float8_e4m3fn)
        w.v_cache = (w.v_cache / vs[:, None]).to(torch.float8_e4m3fn)
        w.variant = {"k_scale": ks, "v_scale": vs}
        tol = dict(atol=3e-2, rtol=3e-2)
    want = mk.tree_attention(w.q, w.k_cache, w.v_cache, w.meta, backend="reference", **w.variant)
    for make in (peers.dense_sdpa_peer, peers.per_branch_peer):
        torch.testing.assert_close(make(w)().float(), want.float(), **tol)
