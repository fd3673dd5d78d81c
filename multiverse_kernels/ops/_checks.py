"""Argument checks shared by the ops. Every error names the argument and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor

from ..metadata import ForestMetadata, MetadataError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: Tensor, *, dim: int | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None,
                 device: torch.device | None = None) -> None:
    if not isinstance(t, Tensor):
        raise MetadataError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise MetadataError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise MetadataError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise MetadataError(f"{name}: expected device {device} (like q), got {t.device}")


def check_attention_args(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    """q [total_q, Hq, D]; k_cache, v_cache [num_pages, page_size, Hk, D], same dtype/device as q."""
    check_tensor("q", q, dim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, dim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v_cache", v_cache, dim=4, dtypes=(q.dtype,), device=q.device)
    if k_cache.shape != v_cache.shape:
        raise MetadataError(
            f"v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    if k_cache.shape[-1] != q.shape[-1]:
        raise MetadataError(
            f"k_cache: expected head_dim {q.shape[-1]} (like q), got {k_cache.shape[-1]}"
        )
    hq, hk = q.shape[1], k_cache.shape[2]
    if hk == 0 or hq % hk != 0:
        raise MetadataError(
            f"k_cache: expected num_kv_heads dividing num_qo_heads = {hq}, got {hk}"
        )


def op_metadata(q: Tensor, k_cache: Tensor, v_cache: Tensor, node_page_indptr: Tensor,
                node_page_indices: Tensor, node_len: Tensor, qo_indptr: Tensor, vis_indptr: Tensor,
                vis_nodes: Tensor, own_full: Tensor | None, validate: bool) -> ForestMetadata:
    """The forest of an attention op's flat arguments (page size from ``k_cache``), checked against
    q and the caches when ``validate``."""
    meta = ForestMetadata(node_page_indptr, node_page_indices, node_len, qo_indptr, vis_indptr,
                          vis_nodes, k_cache.shape[1], own_full)
    if validate:
        check_attention_args(q, k_cache, v_cache)
        meta.validate(num_pages=k_cache.shape[0])
        if meta.total_q != q.shape[0]:
            raise MetadataError(f"q: expected {meta.total_q} rows (qo_indptr[-1]), got {q.shape[0]}")
    return meta
