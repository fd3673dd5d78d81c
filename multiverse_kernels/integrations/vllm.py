"""A vLLM (v1) attention backend over ``tree_attention``: every shared prefix block read once per step.

Turned on by vLLM's own switch, in every vLLM process, with no user code: the package's
``vllm.general_plugins`` entry point (pyproject.toml) calls :func:`register`, which registers
:class:`MultiverseAttentionBackend` as ``AttentionBackendEnum.CUSTOM`` and makes the CPU platform honour a
``CUSTOM`` choice (vLLM 0.32's CPU platform otherwise hands out ``CPU_ATTN`` whatever is asked). So::

    vllm serve MODEL --attention-backend CUSTOM              # or
    LLM(model, attention_backend="CUSTOM")

selects it on CPU (the C++ ``cpu`` backend) and on GPU (``cuda`` / ``triton``); without that choice
vLLM's own backend stays the default. A configuration it cannot run (dtype, KV-cache dtype, head size,
attention type, MLA, ...) is refused when the backend is selected, with the reasons.

Each step the metadata builder turns the block tables into a forest (requests whose tables start with
the same blocks share nodes, split where they diverge:
:func:`~multiverse_kernels.integrations.vllm_sharing.forest_from_block_table`, C++ for CPU tables,
vectorised torch for GPU ones), once, and every layer runs attention on that one ``ForestMetadata``: on
CPU the builder also makes the step's C++ plans and each layer only runs the C++ kernel (its KV write is
one C++ call too); elsewhere ``tree_attention`` (the backends plan once per step and reuse the plan
across layers: ``plan_cache``; with CUDA graphs the builder plans into fixed buffers). Environment:
``MULTIVERSE_VLLM_SHARE=0`` reads every request's blocks itself (no sharing, for comparisons);
``MULTIVERSE_VLLM_KERNEL`` picks the tree_attention backend (default ``auto``: ``cpu`` on CPU tensors,
``cuda`` / ``triton`` on GPU).

KV cache: vLLM's per-layer tensor (logical ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``,
K then V in the last dim) is read in place as ``k_cache = kv.transpose(1, 2)[..., :D]`` and
``v_cache = kv.transpose(1, 2)[..., D:]`` (``[num_blocks, block_size, Hk, D]`` with strides; the
kernels need only ``head_dim`` contiguous). Preferred layout: on CPU blocks, then heads, then tokens
(LBHNC: head-major, faster for the CPU kernel); elsewhere blocks, then tokens, then heads (LBNHC).
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.config import get_layers_from_vllm_config
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from ..metadata import ForestMetadata
from ..ops import tree_attention
from ..ops.tree_attention import add_sinks
from ..planning import TreePlan
from .vllm_sharing import FixedStepBuffers, PlanKey, SharingStats, forest_from_block_table

__all__ = [
    "register",
    "MultiverseAttentionBackend",
    "MultiverseAttentionMetadata",
    "MultiverseAttentionMetadataBuilder",
    "MultiverseAttentionImpl",
    "BACKEND_PATH",
    "HEAD_SIZES",
    "STATS",
]

log = logging.getLogger("vllm.multiverse_kernels")  # under vLLM's logger: its handlers and level apply

STATS = {"steps": 0, "listed_blocks": 0, "unique_blocks": 0, "shared_nodes": 0, "fallbacks": 0,
         "fixed_steps": 0, "capacity_fallbacks": 0}
"""Totals over the metadata builds of this process (what sharing the block tables had): block-table
entries listed, unique blocks among them (the blocks one step reads), shared nodes, steps whose tables
failed the sharing check (run unshared); steps built into the fixed (CUDA-graph) buffers, and those of
them whose shared forest exceeded the buffers' capacity (run unshared)."""

BACKEND_PATH = "multiverse_kernels.integrations.vllm.MultiverseAttentionBackend"
HEAD_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 256]
"""Head sizes declared to vLLM (what the tests and the kernels cover)."""


def _flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return default
    return v.strip().lower() not in ("0", "off", "false", "no")


def register() -> None:
    """The ``vllm.general_plugins`` entry point (runs in every vLLM process, maybe more than once):
    register the backend as ``CUSTOM`` (unless something else already claimed it) and let the CPU
    platform honour ``CUSTOM``."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if not custom.is_overridden():
        register_backend(custom, BACKEND_PATH)
    elif custom.get_path() != BACKEND_PATH:
        log.info("multiverse_kernels: AttentionBackendEnum.CUSTOM is already %s; not registering",
                 custom.get_path())
    _patch_cpu_platform()


def _patch_cpu_platform() -> None:
    """vLLM 0.32's ``CpuPlatform.get_attn_backend_cls`` returns CPU_ATTN for any non-MLA choice. Wrap it so
    that a ``CUSTOM`` choice returns the registered class after the same configuration check the CUDA
    platform does (a refusal names the reasons); every other choice goes to the original."""
    from vllm.platforms import cpu as cpu_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plat = cpu_platform.CpuPlatform
    orig = plat.__dict__["get_attn_backend_cls"]
    if getattr(orig, "_multiverse_wrapped", False):
        return
    orig_fn = orig.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend == AttentionBackendEnum.CUSTOM and not attn_selector_config.use_mla:
            path = AttentionBackendEnum.CUSTOM.get_path()
            backend_cls = AttentionBackendEnum.CUSTOM.get_class()
            reasons = backend_cls.validate_configuration(device_capability=None,
                                                         **attn_selector_config._asdict())
            if reasons:
                raise ValueError(f"Selected backend {selected_backend} ({path}) is not valid for this "
                                 f"configuration. Reason: {reasons}")
            log.info("Using %s backend (%s).", selected_backend, path)
            return path
        return orig_fn(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._multiverse_wrapped = True  # type: ignore[attr-defined]
    plat.get_attn_backend_cls = classmethod(get_attn_backend_cls)  # type: ignore[method-assign]


class MultiverseAttentionBackend(AttentionBackend):
    """Decoder self-attention over vLLM's paged KV cache with ``tree_attention``."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]  # any page size

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM maps the name back to its enum member

    @staticmethod
    def get_impl_cls() -> type[MultiverseAttentionImpl]:
        return MultiverseAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[MultiverseAttentionMetadataBuilder]:
        return MultiverseAttentionMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(HEAD_SIZES)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Both are read in place; vLLM picks the first. On CPU head-major (LBHNC: one head's tokens
        # adjacent in a block, a stream the hardware prefetchers follow; CPU_ATTN's own layout): as fast
        # as token-major or faster (docs/performance.md, "head-major caches"). Elsewhere token-major.
        if current_platform.is_cpu():
            return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)
        return (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC)

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return True

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink,
                             use_sparse, use_mm_prefix, device_capability) -> str | None:
        if kv_cache_dtype not in (None, "auto") and (
                (kv_cache_dtype == "float16") != (dtype == torch.float16)
                or (kv_cache_dtype == "bfloat16") != (dtype == torch.bfloat16)):
            return f"kv_cache_dtype {kv_cache_dtype} differs from the model dtype {dtype}"
        return None


@dataclass
class MultiverseAttentionMetadata:
    """One step's metadata, shared by every layer of the KV-cache group."""

    num_actual_tokens: int
    forest: ForestMetadata
    sharing: SharingStats | None = None
    plans: dict = field(default_factory=dict)
    """The step's C++ CPU run arguments (the run forest's ``node_page_indptr`` and ``node_page_indices``
    after tiny-node absorption, the plan's ``tensors()`` and ``ints()``), one per layer configuration
    (heads, head size, KV element size, window): made by the builder (``cpu_run_keys``), or by the first
    layer that finds its key missing; every layer of the step reuses them."""
    fixed_plans: dict[PlanKey, TreePlan] | None = None
    """Set when the step was built into the builder's fixed buffers (CUDA graphs): one padded plan per
    layer configuration (:meth:`MultiverseAttentionImpl.plan_key`), ``forest`` then lives in the same
    buffers and has one padding group for the rows past the real query rows."""


def _fixed_tokens(vllm_config, device) -> int:
    """Largest step (tokens) built into fixed buffers: vLLM's largest CUDA-graph capture size when full
    graphs are on (CUDA), raised to ``MULTIVERSE_VLLM_FIXED_BUFFERS`` (tokens) when that is set (any
    device; tests). The variable never lowers it: a captured step outside the buffers would plan inside
    the graph."""
    forced = os.environ.get("MULTIVERSE_VLLM_FIXED_BUFFERS", "").strip()
    if forced and not forced.isdigit():
        raise ValueError(f"MULTIVERSE_VLLM_FIXED_BUFFERS: expected a token count, got {forced!r}")
    graphs = 0
    cc = vllm_config.compilation_config if vllm_config is not None else None
    if cc is not None and torch.device(device).type == "cuda" and cc.cudagraph_mode.has_full_cudagraphs():
        graphs = int(cc.max_cudagraph_capture_size or 0)
    return max(graphs, int(forced or 0))


class MultiverseAttentionMetadataBuilder(AttentionMetadataBuilder[MultiverseAttentionMetadata]):
    """Block tables -> one forest per step (shared prefix blocks become shared nodes).

    CUDA graphs (``UNIFORM_BATCH``: vLLM captures full graphs of decode steps, speculative ones included,
    and runs mixed prefill/decode steps eagerly): every step of at most the largest capture size is built
    into :class:`~multiverse_kernels.integrations.vllm_sharing.FixedStepBuffers`, so a replay reads the
    step's forest and plans at the captured addresses with the captured grid; the plans are made here,
    one per layer configuration, never inside the forward."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.share = _flag("MULTIVERSE_VLLM_SHARE", True)
        self.last_stats: SharingStats | None = None
        self.fixed_tokens = _fixed_tokens(vllm_config, device)
        self.fixed: FixedStepBuffers | None = None  # allocated at the first step (needs the table width)
        self._keys: list[PlanKey] | None = None
        self._cpu_keys: list[CpuRunKey] | None = None

    def plan_keys(self) -> list[PlanKey]:
        """The distinct layer configurations of this builder's layers (what the fixed plans cover)."""
        if self._keys is None:
            layers = get_layers_from_vllm_config(self.vllm_config, AttentionLayerBase, self.layer_names)
            self._keys = sorted({layer.impl.plan_key() for layer in layers.values()
                                 if isinstance(layer.impl, MultiverseAttentionImpl)})
        return self._keys

    def cpu_run_keys(self) -> list[CpuRunKey]:
        """The plan keys of the layers that run the C++ CPU kernel (CPU device, kernel ``auto`` / ``cpu``,
        a float32 / float16 / bfloat16 cache), which :meth:`build` plans for: the plan/run split of the
        other backends, and as vLLM builds its own scheduler metadata, outside the layers' ``forward``.
        A layer whose key is not here (e.g. its query dtype differs from the cache's) plans in its first
        call of the step."""
        if self._cpu_keys is None:
            dt = self.kv_cache_spec.dtype
            cpu = torch.device(self.device).type == "cpu" and _kernel_choice() in ("auto", "cpu") \
                and dt in _CPU_DTYPES
            self._cpu_keys = [(hq, hk, d, dt.itemsize, window or None)
                              for hq, hk, d, window in self.plan_keys()] if cpu else []
        return self._cpu_keys

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MultiverseAttentionMetadata:
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor) or not cm.causal:
            raise NotImplementedError("multiverse_kernels' vLLM backend runs causal decoder attention only")
        R = cm.num_reqs
        qsl = cm.query_start_loc[: R + 1]
        # C++ on CPU tables (~10-35 us a decode step), vectorised torch on GPU ones
        forest, stats = forest_from_block_table(cm.block_table_tensor, cm.seq_lens[:R], qsl, self.block_size,
                                                share=self.share, stats=True)
        self.last_stats = stats
        STATS["steps"] += 1
        STATS["listed_blocks"] += stats.listed_blocks
        STATS["unique_blocks"] += stats.unique_blocks
        STATS["shared_nodes"] += stats.shared_nodes
        STATS["fallbacks"] += int(stats.fallback)
        n = cm.num_actual_tokens
        if n > self.fixed_tokens:
            meta = MultiverseAttentionMetadata(num_actual_tokens=n, forest=forest, sharing=stats)
            for key in self.cpu_run_keys():  # the step's plans, here, before any layer runs
                meta.plans[key] = _cpu_run_args(forest, key)
            return meta
        # fixed buffers (CUDA graphs): the step's forest and plans at addresses that never move
        tab = cm.block_table_tensor
        if self.fixed is None:
            self.fixed = FixedStepBuffers(self.fixed_tokens, self.fixed_tokens * tab.shape[1], tab.device)
        before = self.fixed.fallbacks
        forest, plans = self.fixed.fill(forest, n, self.plan_keys(), lambda: forest_from_block_table(
            tab, cm.seq_lens[:R], qsl, self.block_size, share=False))
        STATS["fixed_steps"] += 1
        STATS["capacity_fallbacks"] += self.fixed.fallbacks - before
        return MultiverseAttentionMetadata(num_actual_tokens=n, forest=forest, sharing=stats,
                                           fixed_plans=plans)


_IMPLS_LOGGED: set[tuple] = set()
_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the C++ cpu kernel's (backends/cpu)
_CPU_KERNEL: tuple | None = None


def _cpu_kernel() -> tuple:
    """(the cpu backend's forward planner from shapes, the C++ run op, the C++ slot-mapping cache write),
    imported on first use (importing the cpu backend loads the C++ library)."""
    global _CPU_KERNEL
    if _CPU_KERNEL is None:
        from ..backends.cpu import step_plan
        from ..backends.cpu._ext import load_extension

        load_extension()
        ops = torch.ops.multiverse_C
        _CPU_KERNEL = (step_plan, ops.tree_attention_run.default, ops.append_kv_slots.default)
    return _CPU_KERNEL


def _kernel_choice() -> str:
    """``MULTIVERSE_VLLM_KERNEL`` (default ``auto``: the C++ kernel on CPU tensors, else the op's backend)."""
    return os.environ.get("MULTIVERSE_VLLM_KERNEL", "auto").strip() or "auto"


CpuRunKey = tuple[int, int, int, int, int | None]
"""(query heads, KV heads, head size, KV element bytes, window or None): the C++ CPU run's plan key."""


def _cpu_run_args(forest: ForestMetadata, key: CpuRunKey) -> tuple:
    """The C++ run op's step arguments for ``key``: the run forest's page table (after tiny-node
    absorption) and the plan's tensor and int lists."""
    hq, hk, d, elem, window = key
    run_meta, plan = _cpu_kernel()[0](forest, hq, hk, d, elem, window, cached=False)
    return (run_meta.node_page_indptr, run_meta.node_page_indices, plan.tensors(), plan.ints())


class MultiverseAttentionImpl(AttentionImpl[MultiverseAttentionMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 **unused: Any) -> None:
        if alibi_slopes is not None:
            raise NotImplementedError("multiverse_kernels' vLLM backend: ALiBi is not supported")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"multiverse_kernels' vLLM backend: attention type {attn_type} is "
                                      "not supported (decoder self-attention only)")
        if kv_sharing_target_layer_name is not None:  # the layer would have to skip its own cache writes
            raise NotImplementedError("multiverse_kernels' vLLM backend: cross-layer KV sharing "
                                      f"(kv_sharing_target_layer_name={kv_sharing_target_layer_name!r}) is "
                                      "not supported")
        given = sorted(k for k, v in unused.items() if v is not None and v is not False)
        if given:  # never drop what vLLM asks of the attention
            raise NotImplementedError("multiverse_kernels' vLLM backend does not implement "
                                      + ", ".join(given))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.window = int(sliding_window) if sliding_window else None
        self.softcap = float(logits_soft_cap) if logits_soft_cap else None
        self.sinks = sinks
        self.attn_type = attn_type
        self._views: tuple | None = None  # (weakref to the last kv_cache, its K view, its V view)
        self.kernel = _kernel_choice()
        what = (num_heads, num_kv_heads, head_size, self.window, self.softcap, sinks is not None, self.kernel)
        if what not in _IMPLS_LOGGED:  # once per distinct layer configuration and process (per TP rank)
            _IMPLS_LOGGED.add(what)
            log.info("multiverse_kernels: attention with %d query / %d KV heads of size %d, window %s, "
                     "soft-cap %s, sinks %s, kernel %s", *what)

    def plan_key(self) -> PlanKey:
        """(query heads, KV heads, head size, window or 0): the layers that can share one plan."""
        return (self.num_heads, self.num_kv_heads, self.head_size, self.window or 0)

    def _caches(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V views [num_blocks, block_size, Hk, D] of the layer's cache, made once per cache
        (vLLM passes a layer the same tensor every step; three view ops cost ~6 us a layer on CPU)."""
        views = self._views
        if views is not None and views[0]() is kv_cache:
            return views[1], views[2]
        kv = kv_cache.transpose(1, 2)  # [num_blocks, block_size, Hk, 2D]
        D = self.head_size
        k, v = kv[..., :D], kv[..., D:]
        self._views = (weakref.ref(kv_cache), k, v)
        return k, v

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if kv_cache.numel() == 0:
            return
        n = slot_mapping.shape[0]
        if kv_cache.is_cuda:
            k_cache, v_cache = self._caches(kv_cache)
            torch.ops._C_cache_ops.reshape_and_cache_flash(
                key[:n], value[:n], k_cache, v_cache, slot_mapping, self.kv_cache_dtype,
                layer._k_scale, layer._v_scale)
            return
        # the C++ copy (csrc/cpu/append_paged_kv.cpp, slot mode): ~3 us a layer, any cache strides, dtype
        # cast, padding slots (-1) skipped
        k_cache, v_cache = self._caches(kv_cache)
        key, value = (t[:n] if t.stride(-1) == 1 else t[:n].contiguous() for t in (key, value))
        slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
        _cpu_kernel()[2](key, value, k_cache, v_cache, slots)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: MultiverseAttentionMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("multiverse_kernels' vLLM backend: fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        k_cache, v_cache = self._caches(kv_cache)
        sinks = self.sinks
        if sinks is not None and sinks.dtype != torch.float32:
            sinks = self.sinks = sinks.float()
        q = query[:n]
        fixed = attn_metadata.fixed_plans
        plan = None if fixed is None else fixed[self.plan_key()]
        if self.kernel in ("auto", "cpu") and q.device.type == "cpu" and q.dtype in _CPU_DTYPES:
            out = self._cpu_forward(q, k_cache, v_cache, attn_metadata, sinks, plan)
        else:  # with a fixed plan: no planning, no sync (capturable)
            out = tree_attention(q, k_cache, v_cache, attn_metadata.forest, sm_scale=self.scale,
                                 backend=self.kernel, validate=False, window=self.window,
                                 softcap=self.softcap, sinks=sinks, plan=plan)
        dst = output[:n]  # vLLM's output is [tokens, Hq, D] (copy_ without a view: ~3 us less a layer)
        dst.copy_(out if dst.dim() == 3 else out.view_as(dst))
        return output

    def _cpu_forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: MultiverseAttentionMetadata, sinks: torch.Tensor | None,
                     plan: TreePlan | None = None) -> torch.Tensor:
        """What ``tree_attention(..., backend="cpu", validate=False)`` runs, without the per-call Python
        layers (argument checks, backend and plan-cache lookups: ~0.07 ms a layer, benchmarks/
        call_overhead.py, as much as the kernel itself on a short decode step): the step's plan
        (``plan``, a fixed-buffer plan, or from ``meta.plans``, made by the metadata builder with the
        cpu backend's own planner), the C++ op called with the step's prepared arguments (the run
        forest's page table and the plan's lists), and the op's sink epilogue."""
        run_op = _cpu_kernel()[1]
        key = (q.shape[1], k_cache.shape[2], q.shape[2], k_cache.element_size(), self.window)
        if plan is not None:
            args = (meta.forest.node_page_indptr, meta.forest.node_page_indices, plan.tensors(), plan.ints())
        elif (args := meta.plans.get(key)) is None:  # not planned by the builder (it plans what it can)
            args = meta.plans[key] = _cpu_run_args(meta.forest, key)
        if q.stride(-1) != 1:  # the kernel's one layout requirement (the caches' views have it)
            q = q.contiguous()
        out, lse = run_op(q, k_cache, v_cache, *args, self.scale, None, self.softcap or 0.0)
        if sinks is not None:
            out, _ = add_sinks(out, lse, sinks)
        return out
