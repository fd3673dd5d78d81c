"""The bottom of the package: loading the compiled C++ libraries (``multiverse_kernels._C`` and
``._C_cuda``, torch op libraries under ``torch.ops.multiverse_C``), their fake implementations, and the
lookup of host ops (the C++ planner and tiny-node absorption) that planning uses when the library is
there. Nothing here imports another module of the package but :mod:`multiverse_kernels._jit` (the
first-use build) and :mod:`multiverse_kernels.plan_format` (the format the library must match), so every
layer above (planning, absorption, the backends) can depend on it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from . import _jit
from .plan_format import FORMAT_STRING

__all__ = ["load_extension", "library_path", "host_op"]

_LOADED: set[str] = set()
_SOURCES: dict[str, str] = {}

def load_extension(name: str = "_C") -> None:
    """Load ``multiverse_kernels.<name>`` (a torch op library, not a Python module).

    Uses the library built at install time when there is one that loads; otherwise builds it from the
    shipped sources against the installed torch on first use (:mod:`multiverse_kernels._jit`, cached,
    one line on stderr while it compiles). Raises ModuleNotFoundError (with the reason) when neither
    works; see docs/build.md.
    """
    if name in _LOADED:
        return
    if name != "_C":
        load_extension("_C")  # defines the multiverse_C schemas the CUDA library implements
    spec = importlib.util.find_spec(f"multiverse_kernels.{name}")
    why = f"multiverse_kernels.{name} was not built at install time"
    loaded = False
    if os.environ.get("MULTIVERSE_PREBUILT") == "0":  # ignore the install-time build (tests the other path)
        why = f"multiverse_kernels.{name} from the install ignored (MULTIVERSE_PREBUILT=0)"
    elif spec is not None and spec.origin is not None:
        try:
            torch.ops.load_library(spec.origin)
            loaded = True
            _SOURCES[name] = spec.origin
        except OSError as e:  # built against another torch (undefined symbols) or a broken build
            why = f"the installed {spec.origin} does not load ({e})"
    if not loaded:
        try:
            _SOURCES[name] = str(_jit.build_and_load(name, why))
        except RuntimeError as e:
            raise ModuleNotFoundError(f"{e} (see docs/build.md; python -m multiverse_kernels.info)") from e
    _LOADED.add(name)
    if name == "_C":
        built = torch.ops.multiverse_C.plan_format()
        if built != FORMAT_STRING:  # one definition: multiverse_kernels/plan_format.py
            raise ImportError(
                f"multiverse_kernels._C was built for the plan format {built!r}, but "
                f"multiverse_kernels/plan_format.py defines {FORMAT_STRING!r}: rebuild the extension "
                "(docs/build.md)")
        _register_fakes()


def library_path(name: str = "_C") -> str | None:
    """Path of the loaded library for ``name`` (install-time build or the first-use cache), or None."""
    return _SOURCES.get(name)


def _register_fakes() -> None:
    lib = "multiverse_C"

    @torch.library.register_fake(f"{lib}::tree_attention_run")
    def _(q, k_cache, v_cache, node_page_indptr, node_page_indices, plan_tensors, plan_ints, sm_scale,
          kv_bytes=None, softcap=0.0, k_scale=None, v_scale=None):
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::tree_attention")
    def _(q, k_cache, v_cache, node_page_indptr, node_page_indices, node_len, qo_indptr, vis_indptr,
          vis_nodes, own_full, sm_scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::tree_attention_backward_run")
    def _(grad_out, grad_lse, q, k_cache, v_cache, out, lse, node_page_indptr, node_page_indices,
          plan_tensors, plan_ints, sm_scale, softcap=0.0):
        return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)

    @torch.library.register_fake(f"{lib}::merge_states")
    def _(v, s):
        return v.new_empty(v.shape[0], v.shape[2], v.shape[3]), v.new_empty(
            v.shape[0], v.shape[2], dtype=torch.float32)

    @torch.library.register_fake(f"{lib}::append_paged_kv")
    def _(k, v, k_cache, v_cache, page_indptr, page_indices, token_node, token_pos):
        return None


def host_op(name: str) -> Callable | None:
    """``torch.ops.multiverse_C.<name>`` (a host op of the C++ library: the planner, tiny-node
    absorption) when the library is built and loads, else None (the callers then run their torch
    version); looked up once per process."""
    if name not in _HOST_OPS:
        try:
            load_extension("_C")
            _HOST_OPS[name] = getattr(torch.ops.multiverse_C, name)
        except (ModuleNotFoundError, ImportError, OSError, RuntimeError, AttributeError):
            _HOST_OPS[name] = None
    return _HOST_OPS[name]


_HOST_OPS: dict[str, Callable | None] = {}
