"""The fused C++ backward of tree_attention (csrc/cpu/tree_attention_backward.cpp): what only it has
(auto and autograd dispatch to it, opcheck of its run op, named argument errors). Its comparisons with the
reference backward on random forests (dtypes, head dims, GQA, page sizes, joins, empty nodes, own_full,
grad_lse, rows that see nothing, split plans, strided caches) are in
tests/ops/test_tree_attention_backward.py.

Workspaces are NaN-poisoned (the ``poisoned`` fixture). Skipped with a visible reason when the extension
is not built, unless MULTIVERSE_REQUIRE_CPP=1 (CI: a missing build fails).
"""

from __future__ import annotations

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.backends import available_backends
from multiverse_kernels.backends.reference.tree_attention_backward import tree_attention_backward as ref_bw
from multiverse_kernels.metadata import ForestMetadata
from multiverse_kernels.testing import grad_tolerance, import_cpu_backend_or_skip, make_inputs, random_forest

cpu_backend = import_cpu_backend_or_skip()
from multiverse_kernels.backends.cpu._ext import run_tree_attention_backward  # noqa: E402 (after the skip)

pytestmark = pytest.mark.usefixtures("poisoned")


def _forest(seed: int, page_size: int, own_full: bool = False, **kw) -> tuple[ForestMetadata, int]:
    f, groups = random_forest(seed, page_size=page_size, **kw)
    m = f.metadata(groups)
    if own_full:
        m = m.with_own_full(torch.rand(m.num_groups, generator=torch.Generator().manual_seed(seed)) < 0.5)
    return m, f.num_pages


def test_auto_and_autograd_use_the_cpu_backward(monkeypatch) -> None:
    """backend="auto" resolves the backward to the C++ kernel, and tree_attention's autograd (any
    forward backend on CPU tensors) calls it."""
    assert available_backends("tree_attention_backward", "cpu")[0] == "cpu"
    calls = []
    real = cpu_backend.run_tree_attention_backward

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(cpu_backend, "run_tree_attention_backward", spy)
    m, pages = _forest(3, 16, max_len=40, max_q_len=8)
    q, k, v = make_inputs(m, pages, 8, 2, 64, torch.float32, seed=3)
    go = torch.randn(q.shape)
    for backend in ("auto", "cpu", "reference"):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        got = torch.autograd.grad((mk.tree_attention(*ins, m, backend=backend) * go).sum(), ins)
        out, lse = mk.tree_attention(q, k, v, m, return_lse=True, backend="reference")
        want = ref_bw(go.double(), None, q.double(), k.double(), v.double(), out.double(), lse, m, 64 ** -0.5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, **grad_tolerance(torch.float32))
    # auto and cpu pick the C++ backward; an explicit reference forward keeps the reference backward
    assert len(calls) == 2


def test_opcheck() -> None:
    m, pages = _forest(4, 16, max_len=40, max_q_len=8)
    q, k, v = make_inputs(m, pages, 4, 2, 64, torch.float32, seed=4)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True, backend="cpu")
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.multiverse.tree_attention_backward.default,
                          (go, gl, q, k, v, out, lse, *m.tensors(), None, 0.125, "cpu", True))
    plan = cpu_backend._plan(q, k, m)
    torch.library.opcheck(torch.ops.multiverse_C.tree_attention_backward_run.default,
                          (go, gl, q, k, v, out, lse, m.node_page_indptr, m.node_page_indices,
                           plan.tensors(), plan.ints(), 0.125))


def test_bad_arguments_are_named() -> None:
    m, pages = _forest(4, 16, max_len=40, max_q_len=8)
    q, k, v = make_inputs(m, pages, 4, 2, 64, torch.float32, seed=4)
    out, lse = mk.tree_attention(q, k, v, m, return_lse=True, backend="cpu")
    plan = cpu_backend._plan(q, k, m)
    with pytest.raises(RuntimeError, match="lse"):
        run_tree_attention_backward(out, None, q, k, v, out, lse.double(), m, 0.1, plan)
    with pytest.raises(RuntimeError, match="grad_lse"):
        run_tree_attention_backward(out, lse[:1], q, k, v, out, lse, m, 0.1, plan)
    with pytest.raises(RuntimeError, match="grad_out"):
        run_tree_attention_backward(out[:1], None, q, k, v, out, lse, m, 0.1, plan)
