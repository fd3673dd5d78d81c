"""Planning (host): the forward's default step (tiny nodes absorbed, then planned) for a 1,024-leaf
forest and a tiny-node token tree."""

import pytest
from conftest import run
from plan_build import thousand_leaf_forest, token_tree_forest

from multiverse_kernels.absorption import absorb_tiny_nodes
from multiverse_kernels.planning import plan_tree_attention

FORESTS = {"1024 leaves": thousand_leaf_forest, "token tree depth 8": lambda: token_tree_forest(8)}


@pytest.mark.parametrize("forest", sorted(FORESTS))
def test_plan_tree_attention(benchmark, forest):
    meta = FORESTS[forest]()
    benchmark.group = f"planning {forest}"
    plan = run(benchmark, lambda: plan_tree_attention(absorb_tiny_nodes(meta, 32, 8), 32, 8))
    assert plan.num_items > 0
