"""The README's drawn example is what KVForest emits, and the README's code runs."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


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
