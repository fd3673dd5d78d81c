"""Forest generators for tests: random forests, and the shapes of real use (defined once in
:mod:`multiverse_kernels.bench.workloads`, re-exported here).

Every generator returns ``(forest, groups)``: a :class:`KVForest` and the query groups
``[(node, q_len), ...]`` of one step; ``forest.metadata(groups)`` gives the metadata. The K/V cache is
filled by :func:`make_inputs`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import random
from collections.abc import Iterator

import torch
from torch import Tensor

from .bench.workloads import beam_forest, eagle_tree_forest, extend_forest, multiverse_forest, sampling_forest
from .bench.workloads import head_major as head_major_view
from .forest import KVForest
from .metadata import ForestMetadata

__all__ = [
    "design_example_forest",
    "random_forest",
    "multiverse_forest",
    "sampling_forest",
    "beam_forest",
    "eagle_tree_forest",
    "extend_forest",
    "make_inputs",
    "tolerance",
    "lse_tolerance",
    "grad_tolerance",
    "import_cpu_backend_or_skip",
    "NO_GPU_REASON",
    "BACKENDS",
    "backend_params",
    "backend_device",
    "poisoned_outputs",
    "assert_close_to_reference",
    "check_tree_attention",
    "check_tree_attention_backward",
    "check_merge_states",
    "check_append_paged_kv",
    "compact_pages",
    "seen_slots",
    "padded_cache",
    "forest_tokens",
]


def _pool(num_pages: int, page_size: int, rng: random.Random | None) -> KVForest:
    order = list(range(num_pages))
    if rng is not None:
        rng.shuffle(order)
    return KVForest(num_pages, page_size, page_order=order)


def design_example_forest() -> tuple[KVForest, list[tuple[int, int]]]:
    """docs/design.md §2's worked example (page size 4, 16 pages): a 10-token trunk, paths A (5 tokens) and
    B (3), a conclusion C (2) joining them; A and B decode one row each, C extends by 2."""
    f = KVForest(16, 4)
    trunk = f.new_sequence(10)
    a, b = f.fork(trunk, 2)
    f.append(a, 5)
    f.append(b, 3)
    c = f.join([a, b])
    f.append(c, 2)
    return f, [(a, 1), (b, 1), (c, 2)]


def random_forest(seed: int, page_size: int = 4, max_len: int = 24, max_nodes: int = 12,
                  max_q_len: int = 4, join_prob: float = 0.25) -> tuple[KVForest, list[tuple[int, int]]]:
    """A random forest: 1-2 roots, forks of random width, joins of random leaf sets, node lengths
    from 0 (empty) and 1 up to ``max_len``, random page order, and groups mixing decode (q_len 1),
    extend (q_len up to ``max_q_len``) and empty groups (q_len 0)."""
    rng = random.Random(seed)
    f = _pool(4096, page_size, rng)
    def rand_len() -> int:
        return rng.choice([0, 1, rng.randint(1, max_len), rng.randint(1, max_len)])
    leaves = [f.new_sequence(rand_len()) for _ in range(rng.randint(1, 2))]
    while f.num_nodes < max_nodes:
        r = rng.random()
        if r < join_prob and len(leaves) >= 2:
            pick = rng.sample(leaves, rng.randint(2, min(4, len(leaves))))
            n = f.join(pick)
            leaves = [x for x in leaves if x not in pick] + [n]
            f.append(n, rand_len())
        else:
            p = rng.choice(leaves)
            kids = f.fork(p, rng.randint(1, 3))
            leaves.remove(p)
            for k in kids:
                f.append(k, rand_len())
            leaves += kids
    for n in leaves:  # make sure most leaves have something to query
        if f.node_len(n) == 0 and rng.random() < 0.7:
            f.append(n, rng.randint(1, max_q_len))
    groups = []
    for n in leaves:
        ln = f.node_len(n)
        q_len = 0 if ln == 0 else rng.choice([1, 1, rng.randint(0, min(ln, max_q_len))])
        groups.append((n, q_len))
    rng.shuffle(groups)
    return f, groups


def make_inputs(meta: ForestMetadata, num_pages: int, num_qo_heads: int = 4, num_kv_heads: int = 2,
                head_dim: int = 64, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random ``q [total_q, Hq, D]`` and caches ``[num_pages, page_size, Hk, D]`` for ``meta``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(meta.total_q, num_qo_heads, head_dim, generator=g)
    shape = (num_pages, meta.page_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``atol``/``rtol`` for comparing a backend's output in ``dtype`` with the reference."""
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    }[dtype]


NO_GPU_REASON = ("no CUDA GPU on this machine (the GPU tests run on a GPU machine via "
                 "python -m multiverse_kernels.gpu_run, docs/gpu.md)")
"""The one skip reason of every GPU-only test: it names the one GPU entry point."""


def import_cpu_backend_or_skip():
    """The ``cpu`` backend module for a test module, or a module-level pytest skip naming why it is
    missing. With ``MULTIVERSE_REQUIRE_CPP=1`` (CI) a missing extension is an error, never a skip."""
    import pytest

    try:
        return importlib.import_module("multiverse_kernels.backends.cpu")
    except (ImportError, OSError, RuntimeError) as e:  # extension not built
        if os.environ.get("MULTIVERSE_REQUIRE_CPP") == "1":
            raise
        pytest.skip(f"C++ CPU extension not built ({e}); see docs/build.md", allow_module_level=True)


# ---- backends, poisoning and the one compare-to-reference helper (tests/ops/test_<op>.py) ---------------

BACKENDS = ("reference", "cpu", "triton", "cuda")
"""Every backend an op's tests are parametrised over (tests/ops/test_<op>.py)."""

_TRITON_POISONED = ("tree_attention", "merge_states", "tree_attention_backward")


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Every backend fills its outputs and workspaces with NaN before its kernels run, so an element a
    kernel forgets to write fails the comparison: the C++/CUDA extensions read
    ``MULTIVERSE_DEBUG_POISON=1`` at every call, the Triton kernel modules their ``POISON`` flag. The one
    switch for both; restores the previous state on exit."""
    old_env = os.environ.get("MULTIVERSE_DEBUG_POISON")
    flags = []
    os.environ["MULTIVERSE_DEBUG_POISON"] = "1"
    try:
        if importlib.util.find_spec("triton") is not None:
            for name in _TRITON_POISONED:
                mod = importlib.import_module(f"multiverse_kernels.backends.triton.{name}")
                flags.append((mod, mod.POISON))
                mod.POISON = True
        yield
    finally:
        for mod, old in flags:
            mod.POISON = old
        if old_env is None:
            os.environ.pop("MULTIVERSE_DEBUG_POISON", None)
        else:
            os.environ["MULTIVERSE_DEBUG_POISON"] = old_env


def _triton_interpreting() -> bool:
    """Whether this process runs the Triton kernels in the interpreter (known before any import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_params(*, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                   interp_slow: bool = False) -> list:
    """``pytest.param`` per backend (id = its name) for ``@pytest.mark.parametrize("backend", ...)``:
    ``cuda`` carries the ``gpu`` mark; with ``interp_slow`` the ``triton`` case is ``slow`` when the
    kernels run in the interpreter (cases that add nothing the interpreter tests above do not check, but
    cost seconds each there)."""
    import pytest

    out = []
    for b in BACKENDS:
        if (only is not None and b not in only) or b in exclude:
            continue
        marks = [pytest.mark.gpu] if b == "cuda" else []
        if b == "triton" and interp_slow and _triton_interpreting():
            marks.append(pytest.mark.slow)
        out.append(pytest.param(b, id=b, marks=marks))
    return out


def backend_device(backend: str) -> str:
    """The device ``backend``'s tests run on in this process, or a pytest skip naming why it cannot run
    here: ``cpu`` needs the built extension (with ``MULTIVERSE_REQUIRE_CPP=1`` a missing one FAILS),
    ``triton`` runs CPU tensors in the interpreter (``TRITON_INTERPRET=1``) or CUDA tensors compiled,
    ``cuda`` needs a CUDA GPU and the built CUDA extension."""
    import pytest

    if backend == "reference":
        return "cpu"
    if backend == "cpu":
        import_cpu_backend_or_skip()
        return "cpu"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        tb = importlib.import_module("multiverse_kernels.backends.triton")
        if tb.INTERPRETED:
            return "cpu"
        if not torch.cuda.is_available():
            pytest.skip("the Triton kernels were compiled (TRITON_INTERPRET was not 1 at import) and there "
                        "is no CUDA GPU; run with TRITON_INTERPRET=1 for the interpreter tests")
        return "cuda"
    if backend == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(NO_GPU_REASON)
        try:
            importlib.import_module("multiverse_kernels.backends.cuda")
        except (ImportError, OSError, RuntimeError) as e:
            if os.environ.get("MULTIVERSE_REQUIRE_CPP") == "1":
                raise
            pytest.skip(f"CUDA extension not built ({e}); see docs/build.md")
        return "cuda"
    raise ValueError(f"unknown backend {backend!r}")


def lse_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``atol``/``rtol`` for a backend's float32 lse against the float64 reference's, for inputs in
    ``dtype`` (the scores are fp32-accumulated products of the same rounded inputs)."""
    if dtype in (torch.float32, torch.float64):
        return dict(atol=1e-4, rtol=1e-4)
    return dict(atol=2e-3, rtol=2e-3)


def grad_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Gradients sum many products of rounded inputs: twice :func:`tolerance`."""
    return {k: 2 * v for k, v in tolerance(dtype).items()}


def assert_close_to_reference(name: str, got: Tensor, want: Tensor, *, like: Tensor | None = None,
                              **tol: float) -> None:
    """THE comparison of a backend's output with the float64 reference's: same shape (and dtype as
    ``like``), no NaN where the reference is finite (a poisoned element the kernel did not write), then
    ``assert_close`` in float64 with ``tol``."""
    if like is not None:
        assert got.dtype == like.dtype, f"{name}: dtype {got.dtype}, expected {like.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    nan = torch.isnan(got) & torch.isfinite(want)
    assert not bool(nan.any()), (f"{name}: {int(nan.sum())} NaN elements where the reference is finite "
                                 "(unwritten poisoned outputs?)")
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


def padded_cache(x: Tensor, pad: int = 16) -> Tensor:
    """``x`` ([pages, page_size, H, D]) as a view with padded slot/page strides (head_dim contiguous)."""
    buf = torch.randn(*x.shape[:-1], x.shape[-1] + pad, generator=torch.Generator().manual_seed(pad))
    buf = buf.to(x.device, x.dtype)
    buf[..., :x.shape[-1]] = x
    return buf[..., :x.shape[-1]]


def check_tree_attention(backend: str, meta: ForestMetadata, num_pages: int, hq: int, hk: int, d: int,
                         dtype: torch.dtype, *, seed: int = 0, plan: dict | None = None,
                         sm_scale: float | None = None, k_view: bool = False,
                         q_view: bool = False) -> tuple[Tensor, Tensor]:
    """``tree_attention`` on ``backend`` (outputs poisoned) against the float64 reference on the same
    rounded inputs: out within :func:`tolerance`, lse within :func:`lse_tolerance`. ``plan``: keyword
    arguments of ``plan_tree_attention`` (a caller's plan, built on the backend's device); ``k_view``:
    caches with padded strides; ``q_view``: q strided in head_dim. The reference backend is checked
    against dense SDPA (``dense_attention``) as well. Returns the backend's (out, lse)."""
    from .dense_mask import dense_attention
    from .ops import tree_attention
    from .planning import plan_tree_attention

    dev = backend_device(backend)
    q, k, v = make_inputs(meta, num_pages, hq, hk, d, dtype, seed=seed)
    m = meta.to(dev)
    qd, kd, vd = q.to(dev), k.to(dev), v.to(dev)
    if k_view:
        kd, vd = padded_cache(kd), padded_cache(vd)
    if q_view:
        qd = qd.transpose(1, 2).contiguous().transpose(1, 2)
    p = None if plan is None else plan_tree_attention(m, hq, hk, head_dim=d, **plan)
    with poisoned_outputs():
        out, lse = tree_attention(qd, kd, vd, m, sm_scale=sm_scale, return_lse=True, backend=backend, plan=p)
    if dev != "cpu":
        torch.cuda.synchronize()
    f64 = [t.double() for t in (q, k, v)]
    ref_out, ref_lse = tree_attention(*f64, meta, sm_scale=sm_scale, return_lse=True, backend="reference")
    if backend == "reference":
        dense_out, dense_lse = dense_attention(*f64, meta, sm_scale=sm_scale, return_lse=True)
        assert_close_to_reference("reference out vs dense", ref_out, dense_out, atol=1e-10, rtol=1e-10)
        assert_close_to_reference("reference lse vs dense", ref_lse, dense_lse, atol=1e-5, rtol=1e-6)
    assert_close_to_reference("out", out, ref_out, like=q, **tolerance(dtype))
    assert lse.dtype == torch.float32
    assert_close_to_reference("lse", lse, ref_lse, **lse_tolerance(dtype))
    return out, lse


def compact_pages(meta: ForestMetadata, extra: int = 2) -> tuple[ForestMetadata, int]:
    """The same forest over a small pool (used pages renumbered, shuffled, plus ``extra`` unused pages
    whose gradients must stay 0): random forests allocate from a 4096-page pool, and the backward's
    dk/dv are cache-sized. Returns (meta, num_pages)."""
    used = torch.unique(meta.node_page_indices.long())
    n = used.numel() + extra
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:used.numel()]
    remap = torch.full((int(used.max()) + 1 if used.numel() else 1,), -1, dtype=torch.long)
    remap[used] = perm
    pages = remap[meta.node_page_indices.long()].to(torch.int32)
    return ForestMetadata(meta.node_page_indptr, pages, meta.node_len, meta.qo_indptr, meta.vis_indptr,
                          meta.vis_nodes, meta.page_size, meta.own_full, meta.node_pos), n


def seen_slots(meta: ForestMetadata, num_slots: int) -> Tensor:
    """bool [num_pages * page_size]: the cache slots some query row sees."""
    seen = torch.zeros(num_slots, dtype=torch.bool)
    qo, vi, vis = meta.qo_indptr.tolist(), meta.vis_indptr.tolist(), meta.vis_nodes.tolist()
    for g in range(meta.num_groups):
        if qo[g + 1] > qo[g]:
            for n in vis[vi[g]:vi[g + 1]]:
                seen[meta.node_token_slots(n)] = True
    return seen


def check_tree_attention_backward(backend: str, meta: ForestMetadata, num_pages: int, hq: int, hk: int,
                                  d: int, dtype: torch.dtype, *, seed: int = 0, sm_scale: float | None = None,
                                  with_lse: bool = True, dead_rows: int = 0, k_view: bool = False,
                                  plan: dict | None = None) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``tree_attention_backward`` on ``backend`` (outputs poisoned) against the float64 reference backward
    on the same rounded inputs (out from the float64 reference forward, rounded to ``dtype``): dq, dk, dv
    within :func:`grad_tolerance` (atol scaled by the largest reference gradient), finite, and exactly 0
    on cache slots no row sees. ``dead_rows``: that many rows made to see nothing (lse -inf, out 0: only
    callers of the op can make them), whose dq must be 0. ``plan``: keyword arguments of
    ``plan_tree_attention`` for the C++ backward (the only one that takes a caller's plan). Returns
    (got, want)."""
    from .backends.reference.tree_attention_backward import tree_attention_backward as ref_bw
    from .ops import tree_attention, tree_attention_backward
    from .planning import plan_tree_attention

    dev = backend_device(backend)
    q, k, v = make_inputs(meta, num_pages, hq, hk, d, dtype, seed=seed)
    sm = d ** -0.5 if sm_scale is None else sm_scale
    out, lse = tree_attention(q.double(), k.double(), v.double(), meta, sm_scale=sm, return_lse=True,
                              backend="reference")
    out = out.to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    go = torch.randn(out.shape, generator=g).to(dtype)
    gl = torch.randn(lse.shape, generator=g) if with_lse else None
    dead = torch.zeros(q.shape[0], dtype=torch.bool)
    if dead_rows:
        dead[torch.randperm(q.shape[0], generator=g)[:dead_rows]] = True
        out = out.masked_fill(dead[:, None, None], 0)
        lse = lse.masked_fill(dead[:, None], float("-inf"))
    m = meta.to(dev)
    kd, vd = k.to(dev), v.to(dev)
    if k_view:
        kd, vd = padded_cache(kd), padded_cache(vd)
    args = [t.to(dev) for t in (go, q)] + [kd, vd] + [t.to(dev) for t in (out, lse)]
    gld = None if gl is None else gl.to(dev)
    with poisoned_outputs():
        if plan is None:
            got = tree_attention_backward(args[0], *args[1:], m, grad_lse=gld, sm_scale=sm, backend=backend)
        else:
            assert backend == "cpu", "only the C++ backward takes a caller's plan"
            from .backends.cpu._ext import run_tree_attention_backward

            p = plan_tree_attention(m, hq, hk, head_dim=d, **plan)
            got = run_tree_attention_backward(args[0], gld, *args[1:], m, sm, p)
    if dev != "cpu":
        torch.cuda.synchronize()
    f64 = [t.double() for t in (go, q, k, v, out)]
    want = ref_bw(f64[0], gl, f64[1], f64[2], f64[3], f64[4], lse, meta, sm)
    scale = max([float(w.abs().max()) for w in want if w.numel()] + [1.0])
    tol = grad_tolerance(dtype)
    for name, a, b, like in zip(("dq", "dk", "dv"), got, want, (q, k, v), strict=True):
        assert bool(torch.isfinite(a).all()), f"{name}: non-finite gradient (unwritten poisoned element?)"
        assert_close_to_reference(f"{name} ({dtype}, d={d}, hq={hq}, hk={hk})", a, b, like=like,
                                  atol=tol["atol"] * scale, rtol=tol["rtol"])
    unseen = ~seen_slots(meta, k.shape[0] * k.shape[1])
    for name, a in (("dk", got[1]), ("dv", got[2])):
        assert bool((a.cpu().reshape(-1, *a.shape[2:])[unseen] == 0).all()), f"{name}: unseen slots must be 0"
    if dead_rows:
        assert bool((got[0].cpu()[dead] == 0).all()), "dq of a row that sees nothing"
    return tuple(got), tuple(want)


def check_merge_states(backend: str, n: int, num_states: int, h: int, d: int, dtype: torch.dtype, *,
                       seed: int = 0) -> None:
    """``merge_states`` on ``backend`` (outputs poisoned) against the float64 reference, on random states
    with empty ones (lse -inf): a row whose states are all empty (out 0, lse -inf) and an empty state
    among others. ``num_states`` 0: nothing to merge, out 0 and lse -inf."""
    from .ops import merge_states

    dev = backend_device(backend)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, num_states, h, d, generator=g).to(dtype)
    s = torch.randn(n, num_states, h, generator=g) * 4
    if num_states:
        s[::3, 0] = float("-inf")  # an empty state among others
        s[min(5, n - 1)] = float("-inf")  # a row with nothing
    with poisoned_outputs():
        out, lse = merge_states(v.to(dev), s.to(dev), backend=backend)
    if dev != "cpu":
        torch.cuda.synchronize()
    if num_states == 0:  # the reference cannot reduce 0 states
        assert out.shape == (n, h, d) and out.dtype == dtype and lse.shape == (n, h)
        assert bool((lse == float("-inf")).all()) and bool((out == 0).all())
        return
    ref_out, ref_lse = merge_states(v.double(), s.double(), backend="reference")
    assert_close_to_reference("out", out, ref_out, like=v, **tolerance(dtype))
    assert lse.dtype == torch.float32
    assert_close_to_reference("lse", lse, ref_lse, atol=1e-5, rtol=1e-5)
    r = min(5, n - 1)
    assert bool(torch.isneginf(lse[r]).all()) and bool((out[r] == 0).all()), "a row with nothing: 0, -inf"


def check_append_paged_kv(backend: str, forest: KVForest, token_node: Tensor, token_pos: Tensor, hk: int,
                          d: int, src: torch.dtype, cache: torch.dtype, *, seed: int = 0,
                          head_major: bool = False) -> None:
    """``append_paged_kv`` on ``backend`` into NaN-filled caches against the reference: bit-exact (the
    Triton interpreter's fp32 -> bf16 cast may differ from round-to-nearest-even by one bf16 ulp), every
    new token written and nothing else. ``head_major``: the backend's caches are stored
    ``[pages, Hk, page_size, D]`` and passed as their ``.transpose(1, 2)`` view."""
    from .ops import append_paged_kv

    dev = backend_device(backend)
    indptr, indices = forest.page_table()
    n = token_node.numel()
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, hk, d, generator=g).to(src)
    v = torch.randn(n, hk, d, generator=g).to(src)
    shape = (forest.num_pages, forest.page_size, hk, d)
    kr = torch.full(shape, float("nan"), dtype=cache)
    vr = kr.clone()
    kc, vc = kr.to(dev), vr.to(dev)
    if head_major:
        kc, vc = head_major_view(kc), head_major_view(vc)
    append_paged_kv(k.to(dev), v.to(dev), kc, vc, indptr.to(dev), indices.to(dev), token_node.to(dev),
                    token_pos.to(dev), backend=backend)
    append_paged_kv(k, v, kr, vr, indptr, indices, token_node, token_pos, backend="reference")
    tol = dict(atol=0.0, rtol=0.0)
    if backend == "triton" and dev == "cpu" and cache == torch.bfloat16 and src != cache:
        tol = dict(atol=0.0, rtol=2.0 ** -7)
    for name, a, b in (("k_cache", kc, kr), ("v_cache", vc, vr)):
        a = a.cpu()
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: written slots differ"
        assert int((~a.isnan()).sum()) == n * hk * d, f"{name}: wrote exactly the new tokens"
        torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=lambda m, nm=name: f"{nm}: {m}")


def forest_tokens(forest: KVForest) -> tuple[Tensor, Tensor]:
    """(token_node, token_pos) int32 of every token of every node of ``forest``."""
    lens = [forest.node_len(n) for n in range(forest.num_nodes)]
    token_node = torch.tensor([n for n, ln in enumerate(lens) for _ in range(ln)], dtype=torch.int32)
    token_pos = torch.tensor([j for ln in lens for j in range(ln)], dtype=torch.int32)
    return token_node, token_pos
