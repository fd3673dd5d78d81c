"""The README's drawn example is what KVForest emits, and the README's code runs."""

import re
from pathlib import Path

from multiverse_kernels.metadata import INDEX_FIELDS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_forest_example():
    text = README.read_text()
    code = re.search(r"```python\n(import torch, multiverse_kernels as mk\n.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(code, ns)
    meta = ns["meta"]
    expect = {}
    for field in INDEX_FIELDS:
        m = re.search(rf"{field}\s*=\s*\[([^\]]*)\]", text)
        expect[field] = [int(x) for x in m.group(1).replace(" ", "").split(",")]
    for field, values in expect.items():
        assert getattr(meta, field).tolist() == values, field
    meta.validate(64)


def test_design_doc_example():
    """docs/design.md §2.3 draws testing.design_example_forest: its fields and its visibility picture."""
    from multiverse_kernels import dense_mask
    from multiverse_kernels.testing import design_example_forest

    text = (README.parent / "docs" / "design.md").read_text()
    section = text[text.index("### 2.3"):text.index("### 2.4")]
    meta = design_example_forest()[0].metadata(design_example_forest()[1])
    for field in INDEX_FIELDS:
        m = re.search(rf"{field}\s*=\s*\[([^\]]*)\]", section)
        assert getattr(meta, field).tolist() == [int(x) for x in m.group(1).split(",")], field
    rows = re.findall(r"row \d \([ABC]\)\s+([#.]+)\s+([#.]+)\s+([#.]+)\s+([#.]+)", section)
    drawn = [[c == "#" for c in "".join(r)] for r in rows]
    assert drawn == dense_mask(meta).tolist()


DOCS = README.parent / "docs"
# A commit-hash-like token: 7-40 hex characters with at least one digit and one letter a-f, standing
# alone (not part of a longer word, path, number or hex literal).
_HASH = re.compile(r"(?<![\w./#-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w/-])")


def test_readme_is_short():
    assert len(README.read_text().splitlines()) < 260


def test_no_commit_hashes_in_user_docs():
    for path in (README, DOCS / "performance.md"):
        found = _HASH.findall(path.read_text())
        assert not found, f"{path.name}: commit-hash-like tokens {found}"


def test_hash_pattern():
    assert _HASH.findall("before commit a0c461c (this morning)") == ["a0c461c"]
    assert not _HASH.findall("sm_100a, 2048^3, 0x1f2e3d4c, docs/img/bench_cpu.json, 2026-12-06, deadbeef")


def _summary_header() -> str:
    """The header line of the main job's summary table for the CPU methods (one fast backend, the peers)."""
    import torch

    from multiverse_kernels.bench.peers import PEERS
    from multiverse_kernels.bench.report import Row, format_summary
    from multiverse_kernels.bench.workloads import make_workload

    w = make_workload("multiverse", "cpu", torch.float32, hq=2, hk=1, d=8)
    rows = [Row("tree_attention[cpu]", 1e-3, 1, roof_share=0.5)]
    rows += [Row(p, 2e-3, 2, is_peer=True) for p in PEERS]
    return format_summary([(w, rows)]).splitlines()[0]


def test_readme_results_table_has_the_main_jobs_layout():
    header = _summary_header()
    assert header.startswith("| forest | dtype | tree_attention[cpu] | % roofline |"), header
    lines = README.read_text().splitlines()
    assert header in lines, f"README has no table with the main job's summary header {header!r}"
    # the rows under it have as many cells as the header
    i = lines.index(header)
    width = header.count("|")
    body = [ln for ln in lines[i + 2:] if ln.startswith("|")]
    assert body and all(ln.count("|") == width for ln in body[:3])


def test_readme_doc_links_exist():
    links = re.findall(r"\]\(((?!https?:)[^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    assert links
    missing = [ln for ln in links if not (README.parent / ln).exists()]
    assert not missing, missing
