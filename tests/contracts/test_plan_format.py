"""One definition of the plan format (multiverse_kernels/plan_format.py, docs/plan.md): Python's TreePlan,
the generated C++ header, the bindings and the compiled extension all use its field lists."""

from __future__ import annotations

import os
import re

import pytest

from multiverse_kernels import plan_format
from multiverse_kernels.planning import TreePlan


def test_treeplan_uses_the_one_definition():
    assert TreePlan.TENSOR_FIELDS == plan_format.TENSOR_FIELDS
    assert TreePlan.INT_FIELDS == plan_format.INT_FIELDS
    # every int field is a dataclass field of TreePlan (from_lists / copy_into round-trip them)
    assert set(plan_format.INT_FIELDS) <= set(TreePlan.__dataclass_fields__)


def test_generated_header_is_current():
    assert plan_format.HEADER.read_text() == plan_format.render_header(), (
        "csrc/include/multiverse/plan_fields.h is stale: run "
        "python -c 'from multiverse_kernels import plan_format; plan_format.main([])'")
    assert plan_format.main(["--check"]) == 0


def test_cpp_sources_expand_the_macro_instead_of_listing_fields():
    """The C++ side names no plan field list of its own: HostPlan and the bindings' enums expand the
    X-macro (a hand-written list would drift)."""
    root = plan_format.HEADER.parent.parent.parent  # csrc/
    for path in (root / "include" / "multiverse" / "plan.h", root / "torch_utils.h"):
        text = path.read_text()
        assert "MULTIVERSE_PLAN_TENSOR_FIELDS" in text and "MULTIVERSE_PLAN_INT_FIELDS" in text, path
        # no hand-written run of three consecutive tensor field names
        joined = r"\W+".join(plan_format.TENSOR_FIELDS[:3])
        assert not re.search(joined, text), path


def test_compiled_extension_reports_the_same_lists():
    from multiverse_kernels.planning import _cpp_planner

    if _cpp_planner() is None:
        if os.environ.get("MULTIVERSE_REQUIRE_CPP") == "1":
            raise AssertionError("multiverse_kernels._C is not built")
        pytest.skip("C++ extension not built (docs/build.md)")
    import torch

    assert torch.ops.multiverse_C.plan_format() == plan_format.FORMAT_STRING
