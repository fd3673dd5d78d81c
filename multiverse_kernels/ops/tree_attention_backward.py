"""``tree_attention_backward``: gradients of :func:`~multiverse_kernels.tree_attention` (docs/design.md §3,
packed tree attention with autograd).

The op ``torch.ops.multiverse.tree_attention_backward`` (with a fake implementation, so a backward graph
traces under ``torch.compile``) dispatches on its ``backend`` argument through
:mod:`multiverse_kernels.backends` (op name ``"tree_attention_backward"``; implemented by the reference
backend, the cpu backend (a fused C++ kernel; ``backend="auto"`` picks it on CPU tensors) and the triton
backend (fused dK/dV and dQ kernels; ``auto`` picks it on CUDA tensors); docs/training.md).
``tree_attention``'s autograd
formula (registered in :mod:`.tree_attention`) calls it; users rarely call it directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..metadata import ForestMetadata, MetadataError
from ..variants import Variant, check_variant
from ._checks import check_attention_args, check_index_devices, fake_checks, op_metadata
from ._dispatch import impl_for

__all__ = ["tree_attention_backward"]

_SCHEMA = (
    "(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k_cache, Tensor v_cache, Tensor out, "
    "Tensor lse, Tensor node_page_indptr, Tensor node_page_indices, Tensor node_len, Tensor qo_indptr, "
    "Tensor vis_indptr, Tensor vis_nodes, Tensor? own_full, float sm_scale, str backend, bool validate, "
    "int window=0, float softcap=0.0, Tensor? sinks=None, Tensor? node_pos=None) -> (Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("multiverse::tree_attention_backward", mutates_args=(), schema=_SCHEMA)
def _tree_attention_backward_op(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor,
    lse: Tensor,
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
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    node_pos: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    meta = op_metadata(q, k_cache, v_cache, node_page_indptr, node_page_indices, node_len, qo_indptr,
                       vis_indptr, vis_nodes, own_full, validate, node_pos)
    if validate:
        _check_grads(grad_out, grad_lse, q, out, lse)
    variant = Variant(window=window or None, softcap=softcap or None, sinks=sinks)
    check_variant(variant, q, k_cache, v_cache)
    # sinks change nothing in the kernels' backward (lse holds the sink term): only window / softcap
    # must be implemented by the backend
    impl = impl_for("tree_attention_backward", backend, q.device,
                    Variant(window=variant.window, softcap=variant.softcap))
    extra = {"variant": variant} if variant else {}
    return impl(grad_out, grad_lse, q, k_cache, v_cache, out, lse, meta, sm_scale, **extra)


def _check_grads(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, out: Tensor, lse: Tensor) -> None:
    rows_heads = (q.shape[0], q.shape[1])
    for name, t, shape in (("out", out, tuple(q.shape)), ("grad_out", grad_out, tuple(q.shape)),
                           ("lse", lse, rows_heads), ("grad_lse", grad_lse, rows_heads)):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise MetadataError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise MetadataError(f"{name}: expected device {q.device} (like q), got {t.device}")
        if not t.is_floating_point():
            raise MetadataError(f"{name}: expected a floating-point tensor, got {t.dtype}")


@_tree_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k_cache, v_cache, out, lse, node_page_indptr, node_page_indices, node_len,
      qo_indptr, vis_indptr, vis_nodes, own_full, sm_scale, backend, validate, window=0, softcap=0.0,
      sinks=None, node_pos=None):
    # no-data checks (index tensors on the meta device would otherwise land here and return garbage)
    # (under torch.compile the real op raises them at run time: fake_checks)
    fake_checks(check_attention_args, q, k_cache, v_cache)
    fake_checks(check_index_devices, q, (node_page_indptr, node_page_indices, node_len, qo_indptr, vis_indptr,
                                         vis_nodes), own_full=own_full)
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)


def tree_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    out: Tensor,
    lse: Tensor,
    meta: ForestMetadata,
    *,
    grad_lse: Tensor | None = None,
    sm_scale: float | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``tree_attention(q, k_cache, v_cache, meta, return_lse=True)`` -> ``(out, lse)``.

    Args:
        grad_out: [total_q, num_qo_heads, head_dim], the gradient of ``out``.
        q, k_cache, v_cache, meta, sm_scale: the forward's arguments.
        out, lse: the forward's outputs (lse float32 [total_q, num_qo_heads]).
        grad_lse: [total_q, num_qo_heads], the gradient of ``lse`` (None: lse unused).
        backend: "auto", "reference", "cpu" (the fused C++ backward, CPU tensors) or "triton" (CUDA
            tensors, or CPU tensors in the interpreter).

    Returns:
        ``(dq, dk_cache, dv_cache)`` shaped and typed like ``q``, ``k_cache``, ``v_cache``; cache slots
        that no query row sees get 0.
    """
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    return _tree_attention_backward_op(grad_out, grad_lse, q, k_cache, v_cache, out, lse, *meta.tensors(),
                                       meta.own_full, float(sm_scale), backend, validate)
