"""One definition per fact; the other places derive from it (or this test fails):

* the forest's index fields (metadata.INDEX_FIELDS): the dataclass, ``tensors()``, the ops' schemas;
* the Triton tile tables (multiverse_kernels/tiles.py): the planner's packed-row limit and the kernels'
  dispatchers read the same objects;
* the benchmark forests (multiverse_kernels/bench/workloads.py): the tests' shape generators and the
  scripts use the same builders.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

from multiverse_kernels import planning, testing, tiles
from multiverse_kernels.bench import workloads
from multiverse_kernels.metadata import INDEX_FIELDS, ForestMetadata

ROOT = Path(__file__).resolve().parents[2]


def test_index_fields_are_the_dataclass_and_schema_order():
    names = [f.name for f in dataclasses.fields(ForestMetadata)]
    assert tuple(names[: len(INDEX_FIELDS)]) == INDEX_FIELDS
    f, groups = workloads.sampling_forest(8, 2, 2, page_size=4)
    meta = f.metadata(groups)
    assert meta.tensors() == tuple(getattr(meta, n) for n in INDEX_FIELDS)
    ops = torch.ops.multiverse
    for op in (ops.tree_attention.default, ops.tree_attention_backward.default):
        args = [a.name for a in op._schema.arguments]
        pos = [args.index(n) for n in INDEX_FIELDS]
        assert pos == sorted(pos) and pos[-1] - pos[0] == len(INDEX_FIELDS) - 1, op


def test_tile_tables_have_one_definition():
    assert planning.MAX_TILE_ROWS is tiles.MAX_TILE_ROWS
    assert tiles.MAX_TILE_ROWS == {d: max(bm for dd, bm in tiles.TILES if dd == d) for d in tiles.HEAD_DIMS}
    pytest.importorskip("triton", reason="triton is not installed: the Triton side of the check")
    fwd = importlib.import_module("multiverse_kernels.backends.triton.tree_attention")
    bwd = importlib.import_module("multiverse_kernels.backends.triton.tree_attention_backward")

    assert fwd.TILES is tiles.TILES and fwd.MAX_BLOCK_M is tiles.MAX_BLOCK_M
    assert bwd.DKDV_TILES is tiles.DKDV_TILES and bwd.DQ_TILES is tiles.DQ_TILES


def test_benchmark_forests_have_one_definition():
    for name in ("multiverse_forest", "sampling_forest", "extend_forest", "beam_forest", "eagle_tree_forest"):
        assert getattr(testing, name) is getattr(workloads, name), name
    spec = importlib.util.spec_from_file_location("cpu_step_parts", ROOT / "scripts" / "cpu_step_parts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    f1, g1 = mod.part_forest("multiverse")
    f2, g2 = workloads.build_forest("multiverse", mod.PAGE)
    assert f1.metadata(g1).tensors().__len__() == 6
    for a, b in zip(f1.metadata(g1).tensors(), f2.metadata(g2).tensors(), strict=True):
        assert torch.equal(a, b)
    assert (mod.HQ, mod.HK, mod.D) == workloads.BENCH_HEADS
