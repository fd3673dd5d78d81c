"""The plan-driven C++ entry points shared by the cpu and cuda backends (``torch.ops.multiverse_C.
tree_attention_run`` / ``tree_attention_backward_run``); loading the library is
:mod:`multiverse_kernels._native`'s."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._native import library_path, load_extension
from ...metadata import ForestMetadata
from ...planning import TreePlan

__all__ = ["load_extension", "library_path", "run_tree_attention", "run_tree_attention_backward"]


def run_tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata,
                       sm_scale: float, plan: TreePlan,
                       kv_bytes: Tensor | None = None, softcap: float | None = None,
                       k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``torch.ops.multiverse_C.tree_attention_run`` on ``plan``: out [total_q, Hq, D] (q.dtype),
    lse [total_q, Hq] float32. The plan's ``reader_lo`` applies a sliding window (a plan built with
    ``window``); ``softcap``: scores ``softcap * tanh(s / softcap)`` (cpu kernels only); ``k_scale`` /
    ``v_scale``: the float32 scales of fp8 caches (``[1]`` or ``[Hk]``; one of each shape is expanded to
    ``[Hk]``, the op takes both the same), keys ``k_cache * k_scale`` (cpu kernels only)."""
    # The kernels take any row/head/page strides but need head_dim contiguous.
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    extra = {"softcap": float(softcap)} if softcap else {}
    if k_scale is not None or v_scale is not None:
        if k_scale is not None and v_scale is not None and k_scale.dim() == v_scale.dim() == 1 and \
                k_scale.shape != v_scale.shape and 1 in (k_scale.numel(), v_scale.numel()):
            hk = max(k_scale.numel(), v_scale.numel())
            k_scale, v_scale = k_scale.expand(hk), v_scale.expand(hk)
        extra["k_scale"], extra["v_scale"] = (None if s is None else s.contiguous()
                                                for s in (k_scale, v_scale))
    return torch.ops.multiverse_C.tree_attention_run(
        q, k_cache, v_cache, meta.node_page_indptr, meta.node_page_indices, plan.tensors(), plan.ints(),
        float(sm_scale), kv_bytes, **extra)


def run_tree_attention_backward(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k_cache: Tensor,
                                v_cache: Tensor, out: Tensor, lse: Tensor, meta: ForestMetadata,
                                sm_scale: float, plan: TreePlan,
                                softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.multiverse_C.tree_attention_backward_run`` on ``plan`` (the forward's): dq like q,
    dk/dv like the caches, in q's dtype (float32 accumulation)."""
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    return torch.ops.multiverse_C.tree_attention_backward_run(
        grad_out, grad_lse, q, k_cache, v_cache, out, lse, meta.node_page_indptr, meta.node_page_indices,
        plan.tensors(), plan.ints(), float(sm_scale), **({"softcap": float(softcap)} if softcap else {}))
