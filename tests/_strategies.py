"""Hypothesis strategies shared by the fuzz tests (tests/ops/test_fuzz.py) and the absorption tests
(tests/contracts/test_absorption.py): valid random forests drawn as a list of forest operations, so a
failure shrinks to a minimal forest."""

from __future__ import annotations

import random

from hypothesis import strategies as st

import multiverse_kernels as mk

NUM_PAGES = 256


@st.composite
def forests(draw, max_ops: int = 6, max_len: int = 20, max_q: int = 4):
    """(ForestMetadata, num_pages): roots, forks, joins and appends drawn step by step."""
    ps = draw(st.sampled_from([1, 2, 4, 16]))
    order = list(range(NUM_PAGES))
    random.Random(draw(st.integers(0, 3))).shuffle(order)
    f = mk.KVForest(NUM_PAGES, ps, page_order=order)
    length = st.integers(0, max_len)
    leaves = [f.new_sequence(draw(length)) for _ in range(draw(st.integers(1, 2)))]
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.sampled_from(["fork", "join", "append"]))
        if op == "join" and len(leaves) >= 2:
            pick = draw(st.lists(st.sampled_from(leaves), min_size=2, max_size=min(3, len(leaves)),
                                 unique=True))
            n = f.join(pick)
            leaves = [x for x in leaves if x not in pick] + [n]
            f.append(n, draw(length))
        elif op == "fork":
            p = draw(st.sampled_from(leaves))
            kids = f.fork(p, draw(st.integers(1, 3)))
            leaves.remove(p)
            for k in kids:
                f.append(k, draw(length))
            leaves += kids
        else:
            f.append(draw(st.sampled_from(leaves)), draw(st.integers(1, 4)))
    groups = [(n, draw(st.integers(0, min(f.node_len(n), max_q)))) for n in leaves]
    own_full = draw(st.one_of(st.just(False), st.lists(st.booleans(), min_size=len(groups),
                                                         max_size=len(groups))))
    return f.metadata(groups, own_full=own_full)
