"""When the CUDA tensor-core kernel cannot take a call (importable without the CUDA extension, so the
normal test suite checks it on CPU tensors)."""

from __future__ import annotations

import torch
from torch import Tensor


def misaligned(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> str | None:
    """Why an fp16/bf16 call with head_dim 64/128/256 (caches of q's dtype or fp8) cannot take the
    tensor-core kernel (its 16-byte cp.async loads need 16-byte aligned base pointers and row/head/page/
    slot strides that are multiples of 16 bytes: 8 elements, 16 for fp8 caches; mirrors
    ``tree_attention_uses_mma`` in csrc/cuda/tree_attention.cu), or None."""
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128, 256):
        return None  # fp32 and other head dims always use the scalar kernel (documented, no warning)
    for name, t, strides in (("q", q, q.stride()[:2]), ("k_cache", k_cache, k_cache.stride()[:3]),
                             ("v_cache", v_cache, v_cache.stride()[:3])):
        if t.data_ptr() % 16:
            return f"{name}.data_ptr() is not 16-byte aligned"
        per = 16 // t.element_size()
        if any(st % per for st in strides):
            return f"{name} strides {tuple(strides)} are not multiples of {per} elements (16 bytes)"
    return None
