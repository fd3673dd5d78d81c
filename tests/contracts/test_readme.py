"""The README's drawn example is what KVForest emits, and the README's code runs."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_forest_example():
    text = README.read_text()
    code = re.search(r"```python\n(import torch, multiverse_kernels as mk\n.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(code, ns)
    meta = ns["meta"]
    expect = {}
    for field in ("node_page_indptr", "node_page_indices", "node_len", "qo_indptr", "vis_indptr",
                  "vis_nodes"):
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
    for field in ("node_page_indptr", "node_page_indices", "node_len", "qo_indptr", "vis_indptr",
                  "vis_nodes"):
        m = re.search(rf"{field}\s*=\s*\[([^\]]*)\]", section)
        assert getattr(meta, field).tolist() == [int(x) for x in m.group(1).split(",")], field
    rows = re.findall(r"row \d \([ABC]\)\s+([#.]+)\s+([#.]+)\s+([#.]+)\s+([#.]+)", section)
    drawn = [[c == "#" for c in "".join(r)] for r in rows]
    assert drawn == dense_mask(meta).tolist()
