"""Loading the compiled extension (``multiverse_kernels._C`` / ``._C_cuda``), fake implementations of
``torch.ops.multiverse_C.*``, and the per-step plan cache shared by the cpu and cuda backends."""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ...metadata import ForestMetadata
from ...planning import TreePlan

__all__ = ["load_extension", "run_tree_attention", "run_tree_attention_backward"]

_LOADED: set[str] = set()

# The C++ side (csrc/torch_utils.h, enums PlanT / PlanI) reads the plan lists in exactly this order.
CPP_PLAN_TENSORS = ("reader_row", "reader_limit", "item_node", "item_kv_start", "item_kv_len",
                    "item_reader_start", "item_num_readers", "item_partial_start", "row_partial_indptr",
                    "row_partial_indices", "merge_rows")
CPP_PLAN_INTS = ("num_readers", "num_items", "num_partials", "num_merge_rows", "max_item_readers",
                 "chunk_tokens", "rows_per_tile")
if tuple(TreePlan.TENSOR_FIELDS) != CPP_PLAN_TENSORS or tuple(TreePlan.INT_FIELDS) != CPP_PLAN_INTS:
    raise ImportError(
        "multiverse_kernels.planning.TreePlan fields changed; update csrc/torch_utils.h (PlanT/PlanI) "
        f"and CPP_PLAN_TENSORS/CPP_PLAN_INTS: got {TreePlan.TENSOR_FIELDS} / {TreePlan.INT_FIELDS}")


def load_extension(name: str = "_C") -> None:
    """Load ``multiverse_kernels.<name>`` (a torch op library, not a Python module).

    Raises ModuleNotFoundError when it was not built (see docs/build.md).
    """
    if name in _LOADED:
        return
    spec = importlib.util.find_spec(f"multiverse_kernels.{name}")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"multiverse_kernels.{name} is not built (pip install --no-build-isolation . with a C++ "
            f"compiler{' and nvcc' if name == '_C_cuda' else ''}; see docs/build.md)")
    if name != "_C":
        load_extension("_C")  # defines the multiverse_C schemas the CUDA library implements
    torch.ops.load_library(spec.origin)
    _LOADED.add(name)
    if name == "_C":
        _register_fakes()


def _register_fakes() -> None:
    lib = "multiverse_C"

    @torch.library.register_fake(f"{lib}::tree_attention_run")
    def _(q, k_cache, v_cache, node_page_indptr, node_page_indices, plan_tensors, plan_ints, sm_scale,
          kv_bytes=None):
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::tree_attention")
    def _(q, k_cache, v_cache, node_page_indptr, node_page_indices, node_len, qo_indptr, vis_indptr,
          vis_nodes, own_full, sm_scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::tree_attention_backward_run")
    def _(grad_out, grad_lse, q, k_cache, v_cache, out, lse, node_page_indptr, node_page_indices,
          plan_tensors, plan_ints, sm_scale):
        return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)

    @torch.library.register_fake(f"{lib}::merge_states")
    def _(v, s):
        return v.new_empty(v.shape[0], v.shape[2], v.shape[3]), v.new_empty(
            v.shape[0], v.shape[2], dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::append_paged_kv")
    def _(k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos):
        return None


def run_tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata,
                       sm_scale: float, plan: TreePlan,
                       kv_bytes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``torch.ops.multiverse_C.tree_attention_run`` on ``plan``: out [total_q, Hq, D] (q.dtype),
    lse [total_q, Hq] float32."""
    # The kernels take any row/head/page strides but need head_dim contiguous.
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    return torch.ops.multiverse_C.tree_attention_run(
        q, k_cache, v_cache, meta.node_page_indptr, meta.node_page_indices, plan.tensors(), plan.ints(),
        float(sm_scale), kv_bytes)


def run_tree_attention_backward(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k_cache: Tensor,
                                v_cache: Tensor, out: Tensor, lse: Tensor, meta: ForestMetadata,
                                sm_scale: float, plan: TreePlan) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.multiverse_C.tree_attention_backward_run`` on ``plan`` (the forward's): dq like q,
    dk/dv like the caches, in q's dtype (float32 accumulation)."""
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    return torch.ops.multiverse_C.tree_attention_backward_run(
        grad_out, grad_lse, q, k_cache, v_cache, out, lse, meta.node_page_indptr, meta.node_page_indices,
        plan.tensors(), plan.ints(), float(sm_scale))
