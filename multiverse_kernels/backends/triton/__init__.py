"""Triton backend: tree attention over a plan (forward and backward), merge and append (docs/triton.md).

Registered for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` is set at import (the
Triton interpreter; how the tests run the kernels without a GPU). :func:`enable_interpreter` adds the
CPU registration later in a process (tests call it so that import order does not matter).

Also registers the measurement hook ``tree_attention_kv_bytes``: the K+V bytes one call of the kernels
actually loads from the caches, counted at the loads while running in the interpreter.
"""

from __future__ import annotations

import os

from torch import Tensor

from ...metadata import ForestMetadata
from .. import register
from ._common import count_loads, interpreter_enabled
from .append_paged_kv import append_paged_kv
from .merge_states import merge_states
from .tree_attention import tree_attention
from .tree_attention_backward import tree_attention_backward

__all__ = ["enable_interpreter", "disable_interpreter", "tree_attention_kv_bytes"]


def tree_attention_kv_bytes(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata,
                            sm_scale: float) -> int:
    """K+V bytes loaded from ``k_cache``/``v_cache`` by one tree-attention call (plan + kernels).

    Measured, not derived: the call runs in the Triton interpreter (inputs are copied to the CPU if
    needed) and every masked-in load address inside the caches' storage is counted.
    """
    if q.device.type != "cpu":
        q, k_cache, v_cache, meta = q.cpu(), k_cache.cpu(), v_cache.cpu(), meta.to("cpu")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with count_loads({"k": k_cache, "v": v_cache}) as tally:
            tree_attention(q, k_cache, v_cache, meta, sm_scale)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return tally["k"] + tally["v"]


def _register(devices: tuple[str, ...]) -> None:
    register("tree_attention", "triton", devices)(tree_attention)
    register("tree_attention_backward", "triton", devices)(tree_attention_backward)
    register("merge_states", "triton", devices)(merge_states)
    register("append_paged_kv", "triton", devices)(append_paged_kv)
    register("tree_attention_kv_bytes", "triton", ("cpu", "cuda"))(tree_attention_kv_bytes)


def enable_interpreter() -> None:
    """Set ``TRITON_INTERPRET=1`` and register the backend for CPU tensors too."""
    os.environ["TRITON_INTERPRET"] = "1"
    _register(("cpu", "cuda"))


def disable_interpreter() -> None:
    """Undo :func:`enable_interpreter`'s registration: CUDA tensors only (the env var is left alone)."""
    _register(("cuda",))


_register(("cpu", "cuda") if interpreter_enabled() else ("cuda",))

