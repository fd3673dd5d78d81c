"""Triton backend: tree attention over a plan (forward and backward), merge and append (docs/triton.md).

Registered for CUDA tensors, and for CPU tensors when the kernels run in the Triton interpreter
(``TRITON_INTERPRET=1`` set before import, the usual Triton switch; how the tests run the kernels
without a GPU).

Also registers the measurement hook ``tree_attention_kv_bytes``: the K+V bytes one call of the kernels
actually loads from the caches, counted at the loads while the kernels run in the interpreter
(:mod:`._measure`, the only module that touches Triton internals).
"""

from __future__ import annotations

from torch import Tensor

from ...metadata import ForestMetadata
from .. import register
from . import tree_attention as _ta
from ._common import interpreted
from ._measure import count_loads, interpreted_kernels
from .append_paged_kv import append_paged_kv
from .merge_states import merge_states
from .tree_attention import tree_attention
from .tree_attention_backward import tree_attention_backward

__all__ = ["INTERPRETED", "tree_attention_kv_bytes"]

# True when the kernels were decorated in interpreter mode (TRITON_INTERPRET=1 at import)
INTERPRETED = interpreted(_ta._tree_attn_kernel)


def tree_attention_kv_bytes(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: ForestMetadata,
                            sm_scale: float) -> int:
    """K+V bytes loaded from ``k_cache``/``v_cache`` by one tree-attention call (plan + kernels).

    Measured, not derived: the call runs in the Triton interpreter (inputs are copied to the CPU if
    needed) and every masked-in load address inside the caches' storage is counted.
    """
    if q.device.type != "cpu":
        q, k_cache, v_cache, meta = q.cpu(), k_cache.cpu(), v_cache.cpu(), meta.to("cpu")
    with interpreted_kernels(), count_loads({"k": k_cache, "v": v_cache}) as tally:
        run_meta, plan = _ta.default_plan(q, k_cache, meta)
        _ta.run_plan(q, k_cache, v_cache, run_meta, sm_scale, plan)
    return tally["k"] + tally["v"]


_DEVICES = ("cpu", "cuda") if INTERPRETED else ("cuda",)
register("tree_attention", "triton", _DEVICES)(tree_attention)
register("tree_attention_backward", "triton", _DEVICES)(tree_attention_backward)
register("merge_states", "triton", _DEVICES)(merge_states)
register("append_paged_kv", "triton", _DEVICES)(append_paged_kv)
register("tree_attention_kv_bytes", "triton", ("cpu", "cuda"))(tree_attention_kv_bytes)
