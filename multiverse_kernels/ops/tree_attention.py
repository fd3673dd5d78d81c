"""``tree_attention``: decode and extend over a KV forest (docs/design.md §2-§3).

Public entry :func:`tree_attention` and the op ``torch.ops.multiverse.tree_attention`` (with a fake
implementation, so it traces under ``torch.compile(fullgraph=True)``). The op dispatches on its
``backend`` argument through :mod:`multiverse_kernels.backends`. It has an autograd formula (below) whose
backward is the op ``torch.ops.multiverse.tree_attention_backward`` (docs/api.md, "Autograd").
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..backends import available_backends
from ..metadata import ForestMetadata, MetadataError
from ..planning import TreePlan, check_plan_window
from ..variants import Variant, check_variant, variant_names
from ._checks import (
    check_attention_args,
    check_index_devices,
    check_sm_scale,
    debug_checks,
    fake_checks,
    op_metadata,
)
from ._dispatch import check_flag, direct_call_ok, impl_for, op_variant
from ._plan_check import check_plan_matches
from .tree_attention_backward import _tree_attention_backward_op

__all__ = ["tree_attention"]


# Explicit schema: ``Tensor[]?`` (the optional precomputed plan) cannot be inferred from type hints.
_SCHEMA = (
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor node_page_indptr, Tensor node_page_indices, "
    "Tensor node_len, Tensor qo_indptr, Tensor vis_indptr, Tensor vis_nodes, Tensor? own_full, "
    "float sm_scale, str backend, bool validate, Tensor[]? plan_tensors=None, int[]? plan_ints=None, "
    "int window=0, float softcap=0.0, Tensor? sinks=None, Tensor? node_pos=None, Tensor? k_scale=None, "
    "Tensor? v_scale=None) -> (Tensor, Tensor)"
)
_NUM_ARGS = 21  # the schema's arguments (the autograd formula returns one gradient slot per argument)
_SINKS_ARG = 17




def _tree_attention_impl(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    node_page_indptr: Tensor,
    node_page_indices: Tensor,
    node_len: Tensor,
    qo_indptr: Tensor,
    vis_indptr: Tensor,
    vis_nodes: Tensor,
    own_full: Tensor | None,
    sm_scale: float,
    backend: str,
    validate: bool,
    plan_tensors: list[Tensor] | None = None,
    plan_ints: list[int] | None = None,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    node_pos: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    meta = op_metadata(q, k_cache, v_cache, node_page_indptr, node_page_indices, node_len, qo_indptr,
                       vis_indptr, vis_nodes, own_full, validate, node_pos)
    check_sm_scale(sm_scale)
    variant = op_variant(window, softcap, sinks, k_scale, v_scale)
    check_variant(variant, q, k_cache, v_cache)  # cheap (no sync): always
    # Sinks run on every backend: one whose kernels do not add exp(sink) to the denominator computes the
    # attention without them, and the epilogue below adds the sink as one more log-sum-exp state with a
    # zero value (exact: the sink is in the denominator only).
    base = dataclasses.replace(variant, sinks=None) if sinks is not None else variant
    impl = impl_for("tree_attention", backend, q.device, base)
    kernel_variant = variant if "sinks" in variant_names(impl) else base
    out, lse = _run(impl, q, k_cache, v_cache, meta, sm_scale, kernel_variant, plan_tensors, plan_ints,
                    validate)
    if kernel_variant.sinks is None and sinks is not None:
        out, lse = add_sinks(out, lse, sinks)
    return out, lse


# The op runs _tree_attention_impl; the public wrapper calls the function itself where the dispatcher would
# add nothing (ops/_dispatch.py, direct_call_ok).
_tree_attention_op = torch.library.custom_op("multiverse::tree_attention", mutates_args=(),
                                             schema=_SCHEMA)(_tree_attention_impl)


def add_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Merge the sink state (value 0, log-weight ``sinks[h]``) into attention states computed without it:
    ``lse' = logaddexp(lse, sink)``, ``out' = out * exp(lse - lse')`` (a row that saw nothing: ``out``
    stays 0 and ``lse' = sink``; a NaN row stays NaN)."""
    s = sinks.to(torch.float32 if lse.dtype != torch.float64 else lse.dtype)[None, :]
    new = torch.logaddexp(lse, s)
    scale = torch.exp(lse - new)
    return (out.float() * scale[..., None]).to(out.dtype), new.to(lse.dtype)


def _run(impl, q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata, sm_scale: float,
         variant: Variant, plan_tensors: list[Tensor] | None, plan_ints: list[int] | None,
         validate: bool) -> tuple[Tensor, Tensor]:
    extra = {"variant": variant} if variant else {}
    if plan_tensors is not None and getattr(impl, "supports_plan", False):
        # a precomputed plan (multiverse_kernels.planning, docs/plan.md); backends without a plan
        # argument ignore it (same math)
        plan = TreePlan.from_lists(plan_tensors, plan_ints if plan_ints is not None else [])
        check_plan_window(plan, variant.window)
        if validate or debug_checks():
            _check_plan(plan, q)
            check_plan_matches(plan, meta, q.shape[1], k_cache.shape[2])
        return impl(q, k_cache, v_cache, meta, sm_scale, plan=plan, **extra)
    return impl(q, k_cache, v_cache, meta, sm_scale, **extra)


def _check_plan(plan: TreePlan, q: Tensor) -> None:
    for f in TreePlan.TENSOR_FIELDS:
        t = getattr(plan, f)
        if t.dtype != torch.int32 or t.device != q.device:
            raise MetadataError(f"plan.{f}: expected int32 on {q.device}, got {t.dtype} on {t.device}")
    if plan.row_partial_indptr.numel() != q.shape[0] + 1:
        raise MetadataError(
            f"plan.row_partial_indptr: expected {q.shape[0] + 1} entries (total_q + 1), got "
            f"{plan.row_partial_indptr.numel()}; was the plan built for this step's metadata?"
        )


@_tree_attention_op.register_fake
def _(q, k_cache, v_cache, node_page_indptr, node_page_indices, node_len, qo_indptr, vis_indptr,
      vis_nodes, own_full, sm_scale, backend, validate, plan_tensors=None, plan_ints=None, window=0,
      softcap=0.0, sinks=None, node_pos=None, k_scale=None, v_scale=None):
    # The argument checks that need no data (index tensors on the meta device are sent here instead of
    # to a kernel); under torch.compile the real op raises them at run time (fake_checks).
    fake_checks(check_attention_args, q, k_cache, v_cache)
    fake_checks(check_sm_scale, sm_scale)
    fake_checks(check_variant, op_variant(window, softcap, sinks, k_scale, v_scale), q, k_cache, v_cache)
    fake_checks(check_index_devices, q, (node_page_indptr, node_page_indices, node_len, qo_indptr,
                                         vis_indptr, vis_nodes), own_full=own_full)
    rows, heads = (q.shape[0], q.shape[1]) if q.dim() >= 2 else (q.numel(), 1)
    out = q.new_empty(rows, heads, q.shape[-1] if q.dim() else 1)
    lse = q.new_empty(rows, heads, dtype=torch.float32)
    return out, lse


# ---------------------------------------------------------------- autograd (docs/design.md §3)
# Differentiable in q, k_cache, v_cache, through both outputs (out and lse). The backward recomputes the
# scores block by block from the saved lse (FlashAttention-style) in the op tree_attention_backward;
# memory is bounded by its block sizes, never L x L. It runs on the forward's backend when that backend
# implements it (cpu: the fused C++ backward; triton: fused Triton kernels), else on backend="auto".
# The index tensors get no gradient.
# Not twice differentiable (tree_attention_backward has no autograd formula).


def _setup_context(ctx, inputs, output) -> None:
    q, k_cache, v_cache, *index, own_full, sm_scale, backend, validate = inputs[:13]
    rest = list(inputs[13:]) + [None] * (_NUM_ARGS - len(inputs))
    plan_tensors, _, window, softcap, sinks, node_pos, k_scale, _ = rest
    out, lse = output
    ctx.save_for_backward(q, k_cache, v_cache, *index, own_full, out, lse, sinks, node_pos)
    ctx.sm_scale = sm_scale
    ctx.backend = backend
    ctx.window, ctx.softcap, ctx.fp8 = window or 0, softcap or 0.0, k_scale is not None
    ctx.num_plan_tensors = None if plan_tensors is None else len(plan_tensors)


def _backward(ctx, grad_out, grad_lse):
    q, k_cache, v_cache, *index, own_full, out, lse, sinks, node_pos = ctx.saved_tensors
    if ctx.fp8:
        raise NotImplementedError("tree_attention: an fp8 KV cache is forward only (no backward)")
    # the forward's backend if it implements the backward, else "auto" (CPU: the C++ backward; CUDA: Triton)
    bw = ctx.backend if ctx.backend in available_backends("tree_attention_backward", q.device) else "auto"
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _tree_attention_backward_op(grad_out, grad_lse, q, k_cache, v_cache, out, lse, *index,
                                             own_full, ctx.sm_scale, bw, False, ctx.window, ctx.softcap,
                                             sinks, node_pos)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[_SINKS_ARG]:
        # d/d sink_h: exp(sink_h - lse) is the sink's softmax weight; it enters the denominator only, so
        # dsink_h = -sum_r P_sink[r, h] * D[r, h] with D = rowsum(dO * O) - dlse (the backward's delta)
        delta = (grad_out.float() * out.float()).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.float()
        dsinks = -(torch.exp(sinks[None, :] - lse) * delta).sum(0)
    # The returned structure mirrors the inputs as the dispatcher passed them: a list of Nones for a
    # plan_tensors list, and nothing for trailing defaulted arguments that were not passed (torch 2.11
    # hands the autograd function only the arguments given, 2.14 all of them: needs_input_grad has one
    # entry per argument either way).
    plan = None if ctx.num_plan_tensors is None else [None] * ctx.num_plan_tensors
    grads = (dq, dk, dv) + (None,) * 10 + (plan, None, None, None, dsinks, None, None, None)
    return grads[:len(ctx.needs_input_grad)]


_tree_attention_op.register_autograd(_backward, setup_context=_setup_context)


def tree_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta: ForestMetadata,
    *,
    sm_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    validate: bool = True,
    plan: TreePlan | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of every query row over the nodes its group sees.

    Args:
        q: [total_q, num_qo_heads, head_dim], float16/bfloat16/float32/float64.
        k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim], dtype of ``q``; K/V of the
            query rows' own tokens must already be written (see :func:`append_paged_kv`).
        meta: the forest (:class:`ForestMetadata`), index tensors on ``q``'s device.
        sm_scale: softmax scale, default ``head_dim ** -0.5``.
        return_lse: also return lse [total_q, num_qo_heads] float32, natural log of the softmax
            denominator (scale included); -inf for a row that sees nothing (its out is 0).
        backend: "auto", "reference", "triton", "cpu" or "cuda".
        validate: check metadata and arguments (syncs with the device). Turn off on the hot path
            once the metadata producer is trusted.
        plan: a precomputed :class:`~multiverse_kernels.planning.TreePlan` for ``meta`` and these
            head counts (build once per step with ``plan_tree_attention``, reuse in every layer);
            the cpu, triton and cuda backends run it instead of planning; the reference ignores it.
        window: sliding window (Mistral, Gemma, GPT-OSS): a row sees a key only if
            ``pos(row) - pos(key) < window``, positions from ``meta.node_pos`` (default: depth along
            the chain, :meth:`ForestMetadata.default_node_pos`).
        softcap: logit soft-cap (Gemma 2): ``s = softcap * tanh(s / softcap)`` on the scaled scores.
        sinks: float32 [num_qo_heads] attention sinks (GPT-OSS): ``exp(sinks[h])`` joins every row's
            softmax denominator; ``lse`` includes it; differentiable.
        k_scale, v_scale: float32 [1] or [num_kv_heads] scales of an fp8 cache (``float8_e4m3fn`` /
            ``float8_e5m2``, float16/bfloat16 q): a key is ``k_cache * k_scale`` (forward only).
            Backends that do not implement a variant raise NotImplementedError naming it
            (``auto`` picks one that does); docs/design.md, "Attention variants".

    Returns:
        out [total_q, num_qo_heads, head_dim] in ``q.dtype`` (and lse if ``return_lse``).

    Differentiable in ``q``, ``k_cache`` and ``v_cache`` (through out and lse) on every backend; the
    backward recomputes blockwise from the saved lse (no L x L mask) on the forward's backend when it
    has one: the fused C++ kernel (cpu), fused dK/dV and dQ Triton kernels (triton), the blocked
    reference (reference); the cuda backend has no backward yet and uses ``auto``'s (triton on CUDA
    tensors). See docs/training.md.
    """
    if not isinstance(meta, ForestMetadata):
        raise MetadataError(f"meta: expected a ForestMetadata, got {type(meta).__name__}")
    if not torch.compiler.is_compiling():
        # (under torch.compile the op itself raises these when the compiled graph runs: an exception
        # raised here while tracing would surface as dynamo's Unsupported instead of MetadataError)
        check_attention_args(q, k_cache, v_cache)
        if meta.page_size != k_cache.shape[1]:
            raise MetadataError(
                f"meta.page_size: expected k_cache.shape[1] = {k_cache.shape[1]}, got {meta.page_size}"
            )
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0  # head_dim 0 is rejected by the op
    try:
        if isinstance(sm_scale, bool):  # float(True) would read a flag as the scale 1.0
            raise TypeError
        sm_scale = float(sm_scale)
    except (TypeError, ValueError):
        raise MetadataError(f"sm_scale: expected a finite float, got {sm_scale!r}") from None
    check_flag("validate", validate)
    variant = Variant(window, softcap, sinks, k_scale, v_scale)
    # eager inference (no gradient, no tracing, no mode): the op's function without the dispatcher
    run = _tree_attention_impl if direct_call_ok(q, k_cache, v_cache, sinks) else _tree_attention_op
    args = (q, k_cache, v_cache, *meta.tensors(), meta.own_full, sm_scale, backend, validate)
    if variant:
        if not torch.compiler.is_compiling():
            check_variant(variant, q, k_cache, v_cache)
        node_pos = meta.positions() if window is not None else None
        pt, pi = (plan.tensors(), plan.ints()) if plan is not None else (None, None)
        out, lse = run(*args, pt, pi, window or 0, float(softcap or 0.0), sinks, node_pos, k_scale, v_scale)
    elif plan is None:
        out, lse = run(*args)
    else:
        out, lse = run(*args, plan.tensors(), plan.ints())
    return (out, lse) if return_lse else out
