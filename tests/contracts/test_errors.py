"""Every error class, in one file: bad and edge input gets a clear MetadataError / ValueError naming the
argument, never a crash and never a quiet wrong answer (docs/errors.md). The first part goes through
every class of the hostile-input survey on every backend it applies to (Triton in the interpreter); the
second ("validation") walks the checks of ``ForestMetadata.validate`` and the ops' argument checks one
field at a time on the design example."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from _triton_interp import TRITON, needs_triton, triton_interpreter  # noqa: F401  (module fixture)

import multiverse_kernels as mk
from multiverse_kernels.metadata import ForestMetadata, MetadataError
from multiverse_kernels.multiverse import MultiverseParseError, MultiverseTags, parse
from multiverse_kernels.ops import tree_attention_backward
from multiverse_kernels.planning import plan_tree_attention
from multiverse_kernels.testing import design_example_forest, make_inputs, random_forest, tolerance

BACKENDS = ("reference", "cpu", *TRITON)
D = 64  # a head_dim every backend runs


def _fork() -> tuple[mk.KVForest, int, int]:
    """A 9-token prompt forked into two branches of 3 and 6 tokens: (forest, branch b, branch c)."""
    f = mk.KVForest(64, 4)
    a = f.new_sequence(9)
    b, c = f.fork(a, 2)
    f.append(b, 3)
    f.append(c, 6)
    return f, b, c


def _inputs(meta: ForestMetadata, hq: int = 4, hk: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = int(meta.qo_indptr[-1])
    q = torch.randn(T, hq, D, generator=g)
    kc = torch.randn(64, meta.page_size, hk, D, generator=g)
    return q, kc, torch.randn(kc.shape, generator=g)


@pytest.fixture
def example():
    f, groups = design_example_forest()
    meta = f.metadata(groups)
    return meta, *_inputs(meta)


# ------------------------------------------------------------------------------ append_paged_kv
@pytest.mark.parametrize("backend", BACKENDS)
def test_append_page_table_disagrees(backend):
    k = torch.randn(1, 2, D)
    kc = torch.zeros(4, 4, 2, D)
    node, pos = torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    i32 = dict(dtype=torch.int32)
    # an empty page list under a page_indptr that claims one page (used to segfault)
    with pytest.raises(MetadataError, match="page_indptr"):
        mk.append_paged_kv(k, k, kc, kc.clone(), torch.tensor([0, 1], **i32), torch.zeros(0, **i32), node,
                           pos, backend=backend)
    # page_indptr longer than page_indices (used to be a bare IndexError)
    with pytest.raises(MetadataError, match="page_indptr"):
        mk.append_paged_kv(k, k, kc, kc.clone(), torch.tensor([0, 3], **i32), torch.tensor([1], **i32), node,
                           pos, backend=backend)
    with pytest.raises(MetadataError, match="page_indices"):
        mk.append_paged_kv(k, k, kc, kc.clone(), torch.tensor([0, 1], **i32), torch.tensor([9], **i32), node,
                           pos, backend=backend)
    with pytest.raises(MetadataError, match="page_indptr"):
        mk.append_paged_kv(k, k, kc, kc.clone(), torch.tensor([1, 1], **i32), torch.tensor([1], **i32), node,
                           pos, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_meta_device_index(backend):
    k = torch.randn(1, 2, D)
    kc = torch.zeros(4, 4, 2, D)
    i32 = dict(dtype=torch.int32)
    with pytest.raises(MetadataError, match="page_indptr: expected device cpu"):
        mk.append_paged_kv(k, k, kc, kc.clone(), torch.tensor([0, 1], **i32).to("meta"),
                           torch.tensor([1], **i32), torch.tensor([0], **i32), torch.tensor([0], **i32),
                           backend=backend, validate=False)


# ------------------------------------------------------------------------------ plan cache
@pytest.mark.parametrize("backend", ("cpu", *TRITON))
@pytest.mark.parametrize("route", ("numpy", "data"))
def test_plan_cache_sees_changes_that_skip_the_version_counter(backend, route):
    f, b, c = _fork()
    meta = f.metadata([(b, 1), (c, 2)])
    q, kc, vc = _inputs(meta)
    first = mk.tree_attention(q, kc, vc, meta, backend=backend)  # plans and caches
    assert torch.allclose(first, mk.tree_attention(q, kc, vc, meta, backend="reference"), atol=1e-4)
    # shrink node c's length behind torch's back (version counter untouched)
    if route == "numpy":
        meta.node_len.numpy()[c] = 4
    else:
        meta.node_len.data[c] = 4
    ref = mk.tree_attention(q, kc, vc, meta, backend="reference")
    out = mk.tree_attention(q, kc, vc, meta, backend=backend)
    torch.testing.assert_close(out, ref, **tolerance(torch.float32))
    assert not torch.allclose(out, first)
    # the page table changed through a shared numpy buffer (used to segfault in the cpu kernel)
    buf = meta.node_page_indptr.numpy()
    buf[1:] = buf[1:] - 1  # node 0 loses a page: 9 tokens need 3 pages -> caught by validation
    with pytest.raises(MetadataError, match="node_page_indptr"):
        mk.tree_attention(q, kc, vc, meta, backend=backend)


def test_validation_runs_once_per_step_metadata(monkeypatch):
    """validate=True checks a step's metadata once (plan_cache.validate_once): again only for other
    tensors, another cache size, or contents changed, in place or behind the version counter."""
    f, b, c = _fork()
    meta = f.metadata([(b, 1), (c, 2)])
    q, kc, vc = _inputs(meta)
    calls = []
    real = mk.ForestMetadata.validate
    monkeypatch.setattr(mk.ForestMetadata, "validate",
                        lambda self, **kw: calls.append(kw) or real(self, **kw))
    for _ in range(3):
        mk.tree_attention(q, kc, vc, meta, backend="cpu")
    assert len(calls) == 1
    mk.tree_attention(q, kc, vc, f.metadata([(b, 1), (c, 2)]), backend="cpu")  # new tensors
    assert len(calls) == 2
    mk.tree_attention(q, torch.cat([kc, kc]), torch.cat([vc, vc]), meta, backend="cpu")  # more pages
    assert len(calls) == 3
    with torch.no_grad():
        meta.node_len[0] += 0  # the version counter moves
    mk.tree_attention(q, kc, vc, meta, backend="cpu")
    assert len(calls) == 4
    meta.node_page_indices.numpy()[0] = 10_000  # behind the counter: checked again, and caught
    with pytest.raises(MetadataError, match="node_page_indices"):
        mk.tree_attention(q, kc, vc, meta, backend="cpu")
    assert len(calls) == 5
    with pytest.raises(MetadataError, match="node_page_indices"):  # a failed check is not remembered
        mk.tree_attention(q, kc, vc, meta, backend="cpu")


@pytest.mark.parametrize("backend", ("cpu", *TRITON))
def test_plan_for_another_step_is_rejected(backend):
    f, b, c = _fork()
    m1 = f.metadata([(b, 1), (c, 1)])
    f.append(b, 2)
    f.append(c, 1)
    m2 = f.metadata([(b, 1), (c, 1)])  # same rows, other lengths
    q, kc, vc = _inputs(m1)
    plan1 = plan_tree_attention(m1, 4, 2, head_dim=D)
    with pytest.raises(MetadataError, match="plan"):
        mk.tree_attention(q, kc, vc, m2, backend=backend, plan=plan1)
    out = mk.tree_attention(q, kc, vc, m2, backend=backend, plan=plan_tree_attention(m2, 4, 2, head_dim=D))
    torch.testing.assert_close(out, mk.tree_attention(q, kc, vc, m2, backend="reference"),
                               **tolerance(torch.float32))


def test_plan_cache_is_thread_safe():
    metas = []
    for seed in range(6):
        f, groups = random_forest(seed, page_size=4, max_len=12, max_nodes=8)
        metas.append(f.metadata(groups))
    inputs = [make_inputs(m, 4096, 4, 2, D, torch.float32, seed=i) for i, m in enumerate(metas)]
    want = [mk.tree_attention(*x, m, backend="reference") for x, m in zip(inputs, metas)]
    errors: list[BaseException] = []

    def work(tid: int) -> None:
        try:
            for it in range(20):
                i = (tid + it) % len(metas)
                out = mk.tree_attention(*inputs[i], metas[i], backend="cpu")
                torch.testing.assert_close(out, want[i], **tolerance(torch.float32))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# ------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("validate", (True, False))
@pytest.mark.parametrize("field", ("node_page_indptr", "vis_nodes", "qo_indptr"))
def test_index_tensor_on_meta_device(example, backend, validate, field):
    meta, q, kc, vc = example
    t = getattr(meta, field)
    bad = ForestMetadata(**{**{f: getattr(meta, f) for f in meta.__dataclass_fields__},
                            field: t.to("meta")})
    with pytest.raises(MetadataError, match=f"{field}: expected device cpu"):
        mk.tree_attention(q, kc, vc, bad, backend=backend, validate=validate)


def test_backward_index_on_meta_device(example):
    meta, q, kc, vc = example
    out, lse = mk.tree_attention(q, kc, vc, meta, return_lse=True, backend="reference")
    bad = ForestMetadata(**{**{f: getattr(meta, f) for f in meta.__dataclass_fields__},
                            "vis_nodes": meta.vis_nodes.to("meta")})
    with pytest.raises(MetadataError, match="vis_nodes: expected device cpu"):
        tree_attention_backward(out, q, kc, vc, out, lse, bad, validate=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_on_meta_device(example, backend):
    meta, q, kc, vc = example
    with pytest.raises(MetadataError, match="k_cache: expected device cpu"):
        mk.tree_attention(q, kc.to("meta"), vc, meta, backend=backend, validate=False)


# ------------------------------------------------------------------------------ shapes and scalars
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("validate", (True, False))
def test_zero_head_dim_and_heads(example, backend, validate):
    meta, q, kc, vc = example
    with pytest.raises(MetadataError, match="head_dim"):
        mk.tree_attention(q[..., :0], kc[..., :0], vc[..., :0], meta, backend=backend, validate=validate)
    with pytest.raises(MetadataError, match="num_qo_heads"):
        mk.tree_attention(q[:, :0], kc, vc, meta, backend=backend, validate=validate)
    with pytest.raises(MetadataError, match="num_kv_heads"):
        mk.tree_attention(q, kc[:, :, :0], vc[:, :, :0], meta, backend=backend, validate=validate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", (float("nan"), float("inf"), -float("inf")))
def test_non_finite_sm_scale_rejected(example, backend, scale):
    meta, q, kc, vc = example
    with pytest.raises(MetadataError, match="sm_scale"):
        mk.tree_attention(q, kc, vc, meta, backend=backend, sm_scale=scale)


@pytest.mark.parametrize("grad", (False, True))  # the direct call and the op (ops/_dispatch.py)
def test_keyword_types_rejected(example, grad):
    """A validate that is not a bool or an sm_scale that is not a number is refused naming it, whether
    the call runs the op's function directly or through the op."""
    meta, q, kc, vc = example
    q = q.clone().requires_grad_(grad)
    with pytest.raises(MetadataError, match="validate: expected a bool"):
        mk.tree_attention(q, kc, vc, meta, backend="cpu", validate="no")
    with pytest.raises(MetadataError, match="sm_scale: expected a finite float"):
        mk.tree_attention(q, kc, vc, meta, backend="cpu", sm_scale="x")
    with pytest.raises(MetadataError, match="sm_scale: expected a finite float, got True"):
        mk.tree_attention(q, kc, vc, meta, backend="cpu", sm_scale=True)
    f, b, c = _fork()
    node, pos = f.append(b, 1)
    k = torch.randn(1, kc.shape[2], kc.shape[3], requires_grad=grad)
    with pytest.raises(MetadataError, match="validate: expected a bool"):
        mk.append_paged_kv(k, k, kc.clone(), vc.clone(), *f.page_table(), node, pos, validate=1)


@pytest.mark.parametrize("compile_backend", ("eager", "aot_eager"))
def test_dtype_error_under_torch_compile(example, compile_backend):
    """Under torch.compile(fullgraph=True) a bad argument reaches the caller as MetadataError itself (the
    op raises it when the compiled graph runs), not as dynamo's Unsupported or TorchRuntimeError."""
    meta, q, kc, vc = example

    @torch.compile(fullgraph=True, backend=compile_backend)
    def fn(q, kc, vc):
        return mk.tree_attention(q, kc, vc, meta, backend="reference")

    with pytest.raises(MetadataError, match=r"k_cache: expected dtype"):
        fn(q.double(), kc, vc)
    assert torch.equal(fn(q, kc, vc), mk.tree_attention(q, kc, vc, meta, backend="reference"))


def test_merge_and_append_errors_under_torch_compile(example):
    meta, q, kc, vc = example
    merge = torch.compile(lambda v, s: mk.merge_states(v, s), fullgraph=True, backend="aot_eager")
    with pytest.raises(MetadataError, match=r"^s: expected dtype"):
        merge(torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 4, dtype=torch.float16))
    i32 = dict(dtype=torch.int32)
    append = torch.compile(lambda k, v: mk.append_paged_kv(
        k, v, kc, vc, torch.tensor([0, 1], **i32), torch.tensor([0], **i32), torch.tensor([0], **i32),
        torch.tensor([0], **i32)), fullgraph=True, backend="aot_eager")
    with pytest.raises(MetadataError, match=r"^v: "):
        append(q[:1, :kc.shape[2]], q[:1, :kc.shape[2]].double())


def test_meta_device_index_tensors_still_rejected(example):
    """Outside torch.compile the fake implementation (where meta-device index tensors are dispatched)
    still raises."""
    meta, q, kc, vc = example
    bad = ForestMetadata(**{**{f: getattr(meta, f) for f in meta.__dataclass_fields__},
                            "vis_nodes": meta.vis_nodes.to("meta")})
    with pytest.raises(MetadataError, match="vis_nodes: expected device"):
        mk.tree_attention(q, kc, vc, bad, backend="reference", validate=False)


def test_debug_checks_override_validate_false(example, monkeypatch):
    meta, q, kc, vc = example
    bad = ForestMetadata(**{**{f: getattr(meta, f) for f in meta.__dataclass_fields__},
                            "node_page_indices": meta.node_page_indices + 1000})
    monkeypatch.setenv("MULTIVERSE_DEBUG_CHECKS", "1")
    with pytest.raises(MetadataError, match="node_page_indices"):
        mk.tree_attention(q, kc, vc, bad, backend="cpu", validate=False)
    i32 = dict(dtype=torch.int32)
    with pytest.raises(MetadataError, match="page_indptr"):
        mk.append_paged_kv(q[:1, :2], q[:1, :2], kc, vc, torch.tensor([0, 1], **i32), torch.zeros(0, **i32),
                           torch.tensor([0], **i32), torch.tensor([0], **i32), backend="cpu", validate=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_own_full_shape_checked_without_validation(example, backend):
    meta, q, kc, vc = example
    bad = meta.with_own_full(torch.ones(meta.num_groups + 4, dtype=torch.bool))
    with pytest.raises(MetadataError, match=r"own_full: expected a bool tensor of shape \(3,\)"):
        mk.tree_attention(q, kc, vc, bad, backend=backend, validate=False)


def test_meta_argument_type(example):
    _, q, kc, vc = example
    with pytest.raises(MetadataError, match="meta: expected a ForestMetadata"):
        mk.tree_attention(q, kc, vc, None)


def test_dense_mask_and_forest_metadata_check_their_input(example):
    meta, *_ = example
    with pytest.raises(MetadataError, match="own_full"):
        mk.dense_mask(meta.with_own_full(torch.ones(7, dtype=torch.bool)))
    f, groups = design_example_forest()
    with pytest.raises(ValueError, match="own_full: expected 3 flags"):
        f.metadata(groups, own_full=[True])


def test_kvforest_constructor_names_the_argument():
    with pytest.raises(ValueError, match="page_size"):
        mk.KVForest(4, 0)
    with pytest.raises(ValueError, match="num_pages"):
        mk.KVForest(0, 4)


# ------------------------------------------------------------------------------ merge_states
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_states_edges_agree_with_reference(backend):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 3, 2, D, generator=g)
    s = torch.randn(4, 3, 2, generator=g)
    s[0] = float("-inf")                      # all empty
    s[1, 1] = float("-inf")                   # one empty state ...
    v[1, 1] = float("nan")                    # ... whose values are NaN: never read
    s[2, 0, 1] = float("nan")                 # NaN lse: the row (head 1) is NaN
    s[3, 2, 0] = float("inf")                 # +inf lse: NaN too
    out, lse = mk.merge_states(v, s, backend=backend)
    ref_out, ref_lse = mk.merge_states(v, s, backend="reference")
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool((lse[0] == float("-inf")).all())
    assert bool(torch.isfinite(out[1]).all()) and bool(torch.isfinite(lse[1]).all())
    assert bool(torch.isnan(out[2, 1]).all()) and bool(torch.isnan(lse[2, 1]))
    assert bool(torch.isfinite(out[2, 0]).all())
    assert bool(torch.isnan(out[3, 0]).all()) and bool(torch.isnan(lse[3, 0]))
    torch.testing.assert_close(out, ref_out, equal_nan=True, **tolerance(torch.float32))
    torch.testing.assert_close(lse, ref_lse, equal_nan=True, **tolerance(torch.float32))
    # zero states: nothing seen
    out0, lse0 = mk.merge_states(v[:, :0], s[:, :0], backend=backend)
    assert torch.equal(out0, torch.zeros(4, 2, D)) and bool((lse0 == float("-inf")).all())


# ------------------------------------------------------------------------------ Multiverse parse
TAGS = MultiverseTags(*range(32, 42))
P, PE, G, GE, OS, OE, PA, PAE, C, CE = TAGS.ids()


@pytest.mark.parametrize("seq,words", [
    ([P, G, 1, GE, PA, 2, PAE, C, 3, CE, PA, 4, PAE, PE], "<Path> after the <Conclusion>"),
    ([P, G, 1, GE, PA, 2, PAE, C, 3, CE, C, 4, CE, PE], "second <Conclusion>"),
    ([P, PA, 2, PAE, G, 1, GE, PA, 3, PAE, PE], "<Goal> after the <Path>"),
    ([P, C, 3, CE, G, 1, GE, PE], "<Goal> after the <Conclusion>"),
])
def test_parse_rejects_misplaced_tags(seq, words):
    with pytest.raises(MultiverseParseError, match=words):
        parse(seq, TAGS)


# ------------------------------------------------------------------------------ converters
def test_converters_reject_bad_ids():
    i64 = dict(dtype=torch.int64)
    with pytest.raises(MetadataError, match=r"page_lists\[0\]: expected ids in \[0, 2\^31\)"):
        mk.from_page_lists([torch.tensor([2**31], **i64)], [1], 4)
    with pytest.raises(MetadataError, match=r"kv_indices: expected ids"):
        mk.from_flashinfer(torch.tensor([0, 1]), torch.tensor([2**31 + 5], **i64), torch.tensor([1]), 4)
    with pytest.raises(MetadataError, match=r"token_slots\[0\]: expected an integer tensor"):
        mk.from_sglang([torch.tensor([1.7, 2.2])])
    with pytest.raises(MetadataError, match="kv_indptr: last entry 3 is past the end of kv_indices"):
        mk.from_flashinfer(torch.tensor([0, 3]), torch.tensor([0, 1]), torch.tensor([1]), 4)
    for ps in (0, -1, 2.0):
        with pytest.raises(MetadataError, match="page_size"):
            mk.from_flashinfer(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1]), ps)
        with pytest.raises(MetadataError, match="page_size"):
            mk.from_page_lists([torch.tensor([0])], [1], ps)
    with pytest.raises(MetadataError, match="kv_last_page_len: request 0"):
        mk.from_flashinfer(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([5]), 4)
    with pytest.raises(MetadataError, match="kv_last_page_len: expected 1 entries"):
        mk.from_flashinfer(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1, 1]), 4)
    # errors name the arguments of the function the caller called
    with pytest.raises(MetadataError, match=r"^qo_indptr: request 0"):
        mk.from_flashinfer(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([2]), 4,
                           qo_indptr=torch.tensor([0, 3]))
    with pytest.raises(MetadataError, match=r"^q_lens: request 0"):
        mk.from_sglang([torch.tensor([0, 1]), torch.tensor([5, 6, 7])], q_lens=[3, 1])


# ------------------------------------------------------------------------------ KVForest
def test_new_sequence_leaves_nothing_on_error():
    f = mk.KVForest(4, 4)
    with pytest.raises(ValueError, match="num_tokens"):
        f.new_sequence(-1)
    with pytest.raises(mk.OutOfPages):
        f.new_sequence(17)
    assert f.num_nodes == 0
    assert f.new_sequence(16) == 0


def test_numpy_import_is_used():  # keep the numpy route above honest: torch shares the buffer
    t = torch.zeros(3, dtype=torch.int32)
    v0 = t._version
    t.numpy()[0] = 5
    assert int(t[0]) == 5 and t._version == v0 and isinstance(t.numpy(), np.ndarray)


# ------------------------------------------------------------------ validation, one field at a time
i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)


@pytest.fixture
def design_inputs():
    f, groups = design_example_forest()
    m = f.metadata(groups)
    q, k, v = make_inputs(m, 16)
    return m, q, k, v


def _raises_meta(match, m, q, k, v, **kw):
    with pytest.raises(MetadataError, match=match):
        mk.tree_attention(q, k, v, m, **kw)


def test_valid_passes(design_inputs):
    m, q, k, v = design_inputs
    m.validate(16)
    mk.tree_attention(q, k, v, m)


def test_index_dtype(design_inputs):
    m, q, k, v = design_inputs
    _raises_meta("vis_nodes: expected dtype torch.int32", replace(m, vis_nodes=m.vis_nodes.long()), q, k, v)


def test_page_index_out_of_range(design_inputs):
    m, q, k, v = design_inputs
    bad = m.node_page_indices.clone()
    bad[2] = 16
    _raises_meta(r"node_page_indices: expected page ids in \[0, 16\)", replace(m, node_page_indices=bad),
            q, k, v)
    bad[2] = -1
    _raises_meta("node_page_indices", replace(m, node_page_indices=bad), q, k, v)


def test_node_id_out_of_range(design_inputs):
    m, q, k, v = design_inputs
    _raises_meta("vis_nodes: expected node ids", replace(m, vis_nodes=i32([0, 1, 0, 2, 0, 1, 2, 9])), q, k, v)


def test_empty_visibility_list_with_rows(design_inputs):
    m, q, k, v = design_inputs
    m2 = replace(m, vis_indptr=i32([0, 2, 2, 6]), vis_nodes=i32([0, 1, 0, 1, 2, 3]))
    _raises_meta("group 1 has 1 query rows but an empty visibility list", m2, q, k, v)


def test_repeating_visibility_list(design_inputs):
    m, q, k, v = design_inputs
    m2 = replace(m, vis_nodes=i32([0, 1, 0, 2, 0, 1, 0, 3]))
    _raises_meta("group 2 lists node 0 more than once", m2, q, k, v)


def test_q_len_larger_than_own_node(design_inputs):
    m, q, k, v = design_inputs
    m2 = replace(m, qo_indptr=i32([0, 1, 2, 5]))
    q2 = torch.randn(5, *q.shape[1:])
    _raises_meta(r"group 2 has q_len 3 but its own \(last-listed\) node 3 has only 2 tokens", m2, q2, k, v)


def test_too_few_pages_for_length(design_inputs):
    m, q, k, v = design_inputs
    _raises_meta("node 0 has 3 pages but node_len", replace(m, node_len=i32([13, 5, 3, 2])), q, k, v)


def test_indptr_shape_and_monotonic(design_inputs):
    m, q, k, v = design_inputs
    _raises_meta("node_page_indptr: expected length", replace(m, node_page_indptr=i32([0, 3, 5, 7])), q, k, v)
    _raises_meta("non-decreasing", replace(m, node_page_indptr=i32([0, 3, 2, 6, 7])), q, k, v)
    _raises_meta(r"vis_indptr: expected vis_indptr\[-1\]", replace(m, vis_indptr=i32([0, 2, 4, 7])), q, k, v)
    _raises_meta("negative", replace(m, node_len=i32([10, -1, 3, 2])), q, k, v)


def test_q_rows_mismatch(design_inputs):
    m, q, k, v = design_inputs
    _raises_meta(r"q: expected 4 rows \(qo_indptr\[-1\]\)", m, q[:3], k, v)


def test_tensor_args(design_inputs):
    m, q, k, v = design_inputs
    _raises_meta("q: expected dtype", m, q.int(), k, v)
    _raises_meta("k_cache: expected dtype", m, q, k.half(), v)
    _raises_meta("k_cache: expected a 4-D tensor", m, q, k[0], v)
    _raises_meta("v_cache: expected the shape of k_cache", m, q, k, v[:, :, :1])
    _raises_meta("k_cache: expected head_dim 64", m, q, k[..., :32], v[..., :32])
    _raises_meta("num_kv_heads dividing num_qo_heads", m, q[:, :3], k, v)
    _raises_meta("meta.page_size", replace(m, page_size=8), q, k, v)


def test_own_full_shape(design_inputs):
    m, q, k, v = design_inputs
    _raises_meta("own_full: expected a bool tensor of shape",
                 replace(m, own_full=torch.ones(2, dtype=torch.bool)), q, k, v)


def test_validation_can_be_switched_off(design_inputs):
    m, q, k, v = design_inputs
    # A repeated node is not caught without validation (the hot path trusts its producer).
    m2 = replace(m, vis_nodes=i32([0, 1, 0, 2, 0, 1, 0, 3]))
    mk.tree_attention(q, k, v, m2, validate=False, backend="reference")


def test_unknown_backend(design_inputs):
    m, q, k, v = design_inputs
    with pytest.raises(ValueError, match="backend: expected one of"):
        mk.tree_attention(q, k, v, m, backend="tpu")


def test_merge_states_args():
    with pytest.raises(MetadataError, match="s: expected shape"):
        mk.merge_states(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5))
    with pytest.raises(MetadataError, match="s: expected dtype"):
        mk.merge_states(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4).half())
    with pytest.raises(MetadataError, match="v: expected a 4-D tensor"):
        mk.merge_states(torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_append_args():
    f = mk.KVForest(4, 4)
    n = f.new_sequence(3)
    node, pos = f.append(n, 2)  # positions 3, 4 -> needs 2 pages
    ip, idx = f.page_table()
    kc = torch.zeros(4, 4, 2, 8)
    vc = torch.zeros_like(kc)
    k = torch.randn(2, 2, 8)
    mk.append_paged_kv(k, k, kc, vc, ip, idx, node, pos)
    with pytest.raises(MetadataError, match="token_pos: token 0 writes position 8 of node 0"):
        mk.append_paged_kv(k, k, kc, vc, ip, idx, node, pos + 5)
    with pytest.raises(MetadataError, match="token_node: expected node ids"):
        mk.append_paged_kv(k, k, kc, vc, ip, idx, node + 1, pos)
    with pytest.raises(MetadataError, match="token_node/token_pos: expected 2 entries"):
        mk.append_paged_kv(k, k, kc, vc, ip, idx, node[:1], pos[:1])
    with pytest.raises(MetadataError, match="k: expected"):
        mk.append_paged_kv(k[:, :1], k[:, :1], kc, vc, ip, idx, node, pos)
    with pytest.raises(MetadataError, match="page_indices: expected page ids"):
        mk.append_paged_kv(k, k, kc[:1], vc[:1], ip, idx, node, pos)
