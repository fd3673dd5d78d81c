"""Argument checks shared by the ops. Every error names the argument and what was expected."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ..metadata import INDEX_FIELDS, ForestMetadata, MetadataError
from ..plan_cache import validate_once
from ..variants import FP8_DTYPES

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
    """q [total_q, Hq, D]; k_cache, v_cache [num_pages, page_size, Hk, D], same dtype/device as q (or an
    fp8 cache with float16/bfloat16 q: its scales are checked by variants.check_variant)."""
    check_tensor("q", q, dim=3, dtypes=FLOAT_DTYPES)
    if isinstance(k_cache, Tensor) and k_cache.dtype in FP8_DTYPES and q.dtype not in (torch.float16,
                                                                                         torch.bfloat16):
        raise MetadataError(f"q: an fp8 KV cache ({k_cache.dtype}) takes float16 or bfloat16 queries, got "
                            f"{q.dtype}")
    cache_dtypes = (q.dtype, *FP8_DTYPES) if q.dtype in (torch.float16, torch.bfloat16) else (q.dtype,)
    check_tensor("k_cache", k_cache, dim=4, dtypes=cache_dtypes, device=q.device)
    check_tensor("v_cache", v_cache, dim=4, dtypes=(k_cache.dtype,), device=q.device)
    if k_cache.shape != v_cache.shape:
        raise MetadataError(
            f"v_cache: expected the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    if k_cache.shape[-1] != q.shape[-1]:
        raise MetadataError(
            f"k_cache: expected head_dim {q.shape[-1]} (like q), got {k_cache.shape[-1]}"
        )
    if q.shape[-1] < 1:
        raise MetadataError(f"q: expected head_dim >= 1, got shape {tuple(q.shape)}")
    if q.shape[1] < 1:
        raise MetadataError(f"q: expected num_qo_heads >= 1, got shape {tuple(q.shape)}")
    hq, hk = q.shape[1], k_cache.shape[2]
    if hk == 0 or hq % hk != 0:
        raise MetadataError(
            f"k_cache: expected num_kv_heads dividing num_qo_heads = {hq}, got {hk}"
        )




def debug_checks() -> bool:
    """True when ``MULTIVERSE_DEBUG_CHECKS=1``: every op validates its arguments even when called with
    ``validate=False`` (the bounds-checked debug mode of docs/errors.md)."""
    return os.environ.get("MULTIVERSE_DEBUG_CHECKS", "0") not in ("", "0")


def fake_checks(check, *args, **kwargs) -> None:
    """Run an op's no-data ``check`` in its fake implementation.

    Outside torch.compile (index tensors on the ``meta`` device are dispatched to the fake
    implementation) the ``MetadataError`` is raised here. While torch.compile traces, it is left to the
    op's real implementation, which runs the same checks when the compiled graph executes: the caller
    then gets the ``MetadataError`` itself (dynamo would re-raise one raised at trace time as its own
    ``TorchRuntimeError``), and the fake implementation returns outputs of the shapes the op would have.
    """
    try:
        check(*args, **kwargs)
    except MetadataError:
        if not torch.compiler.is_compiling():
            raise


def check_index_devices(q: Tensor, tensors: tuple, names: tuple[str, ...] = INDEX_FIELDS,
                        own_full: Tensor | None = None) -> None:
    """Cheap checks (no device sync) run whatever ``validate`` says: every index tensor is an int32
    1-D tensor on ``q``'s device (a tensor on the ``meta`` device or on another device than ``q``
    would otherwise be dispatched to the fake implementation or read out of bounds)."""
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, Tensor):
            raise MetadataError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise MetadataError(f"{name}: expected device {q.device} (like q), got {t.device}")
        if t.dtype != torch.int32:
            raise MetadataError(f"{name}: expected dtype torch.int32, got {t.dtype}")
        if t.dim() != 1:
            raise MetadataError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if own_full is not None:
        if not isinstance(own_full, Tensor) or own_full.dtype != torch.bool:
            got = getattr(own_full, "dtype", type(own_full).__name__)
            raise MetadataError(f"own_full: expected a bool tensor, got {got}")
        if own_full.device != q.device:
            raise MetadataError(f"own_full: expected device {q.device} (like q), got {own_full.device}")
        groups = tensors[3].shape[0] - 1 if len(tensors) > 3 else None  # qo_indptr: num_groups + 1
        if groups is not None and tuple(own_full.shape) != (groups,):
            raise MetadataError(f"own_full: expected a bool tensor of shape ({groups},) (num_groups), got "
                                f"{tuple(own_full.shape)}")


def check_sm_scale(sm_scale: float) -> None:
    """A non-finite softmax scale is rejected (docs/errors.md, NaN policy)."""
    if not isinstance(sm_scale, (int, float)) or not math.isfinite(sm_scale):
        raise MetadataError(f"sm_scale: expected a finite float, got {sm_scale!r}")


def op_metadata(q: Tensor, k_cache: Tensor, v_cache: Tensor, node_page_indptr: Tensor,
                node_page_indices: Tensor, node_len: Tensor, qo_indptr: Tensor, vis_indptr: Tensor,
                vis_nodes: Tensor, own_full: Tensor | None, validate: bool,
                node_pos: Tensor | None = None) -> ForestMetadata:
    """The forest of an attention op's flat arguments (page size from ``k_cache``), checked against
    q and the caches when ``validate``."""
    check_index_devices(q, (node_page_indptr, node_page_indices, node_len, qo_indptr, vis_indptr,
                            vis_nodes), own_full=own_full)
    if node_pos is not None and node_pos.device != q.device:
        raise MetadataError(f"node_pos: expected device {q.device} (like q), got {node_pos.device}")
    meta = ForestMetadata(node_page_indptr, node_page_indices, node_len, qo_indptr, vis_indptr,
                          vis_nodes, k_cache.shape[1], own_full, node_pos)
    check_attention_args(q, k_cache, v_cache)  # shapes/dtypes/devices only: no sync, always on
    if validate or debug_checks():
        validate_once(meta, num_pages=k_cache.shape[0])  # once per step's metadata (plan_cache.py)
        if meta.total_q != q.shape[0]:
            raise MetadataError(f"q: expected {meta.total_q} rows (qo_indptr[-1]), got {q.shape[0]}")
    return meta
