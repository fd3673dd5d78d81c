"""Attention variants of current open models, as one value every op and backend receives.

* ``window`` (Mistral, Gemma 2/3, GPT-OSS sliding layers): row r sees key k iff the forest lets it AND
  ``pos(r) - pos(k) < window``, positions from ``meta.node_pos`` (:meth:`ForestMetadata.positions`). A
  row's position is its own token's.
* ``softcap`` (Gemma 2): ``s = softcap * tanh(s / softcap)`` on the scaled score, before the softmax.
* ``sinks`` (GPT-OSS) float32 ``[Hq]``: ``exp(sinks[h])`` is added to every row's softmax denominator
  (a learned "attend to nothing" logit); ``lse`` includes it, so merges stay exact, and a row that sees
  no key gets ``out = 0`` and ``lse = sinks[h]``. Differentiable.
* fp8 KV cache: ``k_cache`` / ``v_cache`` of dtype ``float8_e4m3fn`` or ``float8_e5m2`` with float32
  ``k_scale`` / ``v_scale`` of shape ``[1]`` (per tensor) or ``[Hk]`` (per KV head): a key is
  ``k_cache.float() * k_scale`` at the load. Forward only; queries float16 / bfloat16.

docs/design.md ("Attention variants") defines them on a forest; :func:`check_variant` is the one place
that validates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .metadata import MetadataError

__all__ = ["Variant", "FP8_DTYPES", "check_variant", "variant_names"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Variant:
    """The attention variant of one call (all off by default: plain attention)."""

    window: int | None = None
    softcap: float | None = None
    sinks: Tensor | None = None
    k_scale: Tensor | None = None
    v_scale: Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.k_scale is not None

    def names(self) -> frozenset[str]:
        """The variants in use: a subset of {"window", "softcap", "sinks", "fp8"}."""
        out = set()
        if self.window is not None:
            out.add("window")
        if self.softcap is not None:
            out.add("softcap")
        if self.sinks is not None:
            out.add("sinks")
        if self.fp8:
            out.add("fp8")
        return frozenset(out)

    def __bool__(self) -> bool:
        return bool(self.names())


PLAIN = Variant()


def variant_names(impl: object) -> frozenset[str]:
    """The variants a backend implementation declares (its ``variants`` attribute; none by default)."""
    return frozenset(getattr(impl, "variants", ()))


def check_variant(v: Variant, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    """Raise :class:`MetadataError` naming the argument for a bad variant argument."""
    w = v.window
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
        raise MetadataError(f"window: expected a positive int (keys within window - 1 positions of the "
                            f"row), got {v.window!r}")
    if v.softcap is not None and (not isinstance(v.softcap, (int, float)) or not math.isfinite(v.softcap)
                                  or v.softcap <= 0):
        raise MetadataError(f"softcap: expected a positive finite float, got {v.softcap!r}")
    hq = q.shape[1] if q.dim() == 3 else None
    if v.sinks is not None:
        s = v.sinks
        if not isinstance(s, Tensor):
            raise MetadataError("sinks: expected a float32 tensor of shape [num_qo_heads], got "
                                f"{type(s).__name__}")
        ok = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
        if s.dtype not in ok or s.dim() != 1 or (hq is not None and s.shape[0] != hq):
            raise MetadataError(f"sinks: expected a float32 tensor of shape [{hq}] (one per query head; "
                                f"float64 too for float64 q), got {s.dtype} {tuple(s.shape)}")
        if s.device != q.device:
            raise MetadataError(f"sinks: expected device {q.device} (q's), got {s.device}")
    fp8_cache = k_cache.dtype in FP8_DTYPES or v_cache.dtype in FP8_DTYPES
    if fp8_cache or v.k_scale is not None or v.v_scale is not None:
        if k_cache.dtype not in FP8_DTYPES or v_cache.dtype != k_cache.dtype:
            raise MetadataError(f"k_cache, v_cache: k_scale / v_scale are for fp8 caches (float8_e4m3fn or "
                                f"float8_e5m2, both the same), got {k_cache.dtype} and {v_cache.dtype}")
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise MetadataError(f"q: an fp8 KV cache takes float16 or bfloat16 queries, got {q.dtype}")
        hk = k_cache.shape[2] if k_cache.dim() == 4 else None
        for name, sc in (("k_scale", v.k_scale), ("v_scale", v.v_scale)):
            if sc is None:
                raise MetadataError(f"{name}: an fp8 KV cache needs float32 scales of shape [1] or "
                                    "[num_kv_heads] (key = cache value * scale), got None")
            if not isinstance(sc, Tensor) or sc.dtype != torch.float32 or sc.dim() != 1 or \
                    sc.shape[0] not in (1, hk):
                raise MetadataError(f"{name}: expected a float32 tensor of shape [1] or [{hk}], got "
                                    f"{getattr(sc, 'dtype', type(sc))} {tuple(getattr(sc, 'shape', ()))}")
            if sc.device != q.device:
                raise MetadataError(f"{name}: expected device {q.device} (q's), got {sc.device}")
