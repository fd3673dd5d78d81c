"""Run a stock Hugging Face causal LM (Qwen2, Llama, ...) over a KV forest.

We register an attention function with ``transformers.AttentionInterface`` under the name
``"multiverse"``. A model switched to it (``model.set_attn_implementation("multiverse")``) takes the
forest of the step through a ``multiverse=`` keyword of its forward; transformers passes unknown keywords
down to every attention call. Because ``"multiverse"`` has no entry in transformers' mask interface,
the model builds no attention mask at all: the forest metadata is the mask.

Two modes of :class:`ForestContext`:

- **paged** (prefill, extend, decode): the step's new tokens are written with :func:`append_paged_kv`
  into each layer's paged cache (:class:`ForestKVCache`, ``[num_pages, page_size, Hk, D]`` per layer),
  then :func:`tree_attention` runs over the step's :class:`ForestMetadata`. The batch is one flat row of
  tokens (``input_ids [1, T]``), ordered like the metadata's query rows; ``position_ids [1, T]`` carries
  Multiverse positions, so RoPE is applied by the model before K is cached.
- **packed** (training / scoring one packed Multiverse sequence): K/V of the sequence stay contiguous
  ``[L, Hk, D]``, viewed as a page-size-1 cache, and every node of :func:`parse`'s forest is its own group.
  No ``L x L`` mask is built. Gradients flow through ``tree_attention``'s autograd formula (a blocked,
  FlashAttention-style backward from the saved lse; memory bounded by its block sizes, see
  ``multiverse_kernels/backends/reference/tree_attention_backward.py``), whatever backend runs the forward.

Use :func:`forest_forward` and :func:`packed_forward`, or pass ``multiverse=ForestContext(...)`` yourself
inside ``with use_multiverse_attention(model):``. The switch is scoped: both functions and the context
manager put the model's previous attention implementation back when they return, so a plain
``model(input_ids)`` afterwards runs as before. A model switched by hand
(``set_attn_implementation("multiverse")``) and called without a forest raises an error that says how to
switch back. :func:`multiverse_kernels.integrations.generate.multiverse_generate` generates in one call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import available_backends, resolve
from ..distributed import even_token_ranges
from ..distributed import tree_attention as cp_tree_attention
from ..metadata import ForestMetadata
from ..ops import append_paged_kv, tree_attention

__all__ = [
    "ATTN_NAME",
    "register",
    "use_multiverse_attention",
    "cache_kwarg",
    "ForestKVCache",
    "ForestContext",
    "multiverse_attention",
    "forest_forward",
    "packed_forward",
    "kv_elements_read",
    "unshared_metadata",
    "kv_bytes_hook",
]

ATTN_NAME = "multiverse"


@dataclass
class ForestKVCache:
    """Per-layer paged K/V caches: ``k[layer], v[layer]`` of shape [num_pages, page_size, Hk, D]."""

    k: list[Tensor]
    v: list[Tensor]

    @classmethod
    def for_model(cls, model: Any, num_pages: int, page_size: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, head_major: bool = False) -> ForestKVCache:
        """Empty (NaN-filled, so unwritten slots cannot go unnoticed) caches sized from ``model.config``.

        ``head_major``: store each cache ``[num_pages, Hk, page_size, D]`` and hold its
        ``.transpose(1, 2)`` view (the same ``[num_pages, page_size, Hk, D]`` indexing, strided): one
        head's rows of a page adjacent, the faster layout for the cpu kernel (docs/api.md)."""
        if not isinstance(head_major, bool):
            raise TypeError(f"head_major: expected a bool, got {head_major!r}")
        cfg = model.config
        hk = cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        dtype = p.dtype if dtype is None else dtype
        device = p.device if device is None else device
        if head_major:
            mk = lambda: torch.full((num_pages, hk, page_size, d), float("nan"), dtype=dtype,
                                    device=device).transpose(1, 2)
        else:
            mk = lambda: torch.full((num_pages, page_size, hk, d), float("nan"), dtype=dtype,
                                    device=device)
        return cls([mk() for _ in range(cfg.num_hidden_layers)], [mk() for _ in range(cfg.num_hidden_layers)])

    def nbytes_per_token(self) -> int:
        """K+V bytes of one token over all layers."""
        return sum(2 * k[0, 0].numel() * k.element_size() for k in self.k)


@dataclass
class ForestContext:
    """What the attention function needs for one forward pass.

    Paged mode: ``meta`` (the step's metadata), ``cache``, and ``token_node``/``token_pos`` int32 [T]
    (where the T new tokens go). Packed mode: ``meta`` from ``MultiverseStructure.metadata()`` and
    ``packed=True`` (no cache). ``backend`` picks the tree_attention backend ("auto": the fastest
    available); ``append_backend`` the append_paged_kv one. ``validate`` checks metadata every layer
    (turn it off on the hot path). ``kv_reads`` accumulates, per call, the K/V elements the attention
    gathers as counted by :func:`kv_elements_read` (a metadata count, not a measurement), in bytes.
    ``attn_meta``: metadata for the attention only (default ``meta``; e.g. :func:`unshared_metadata`
    for a per-path baseline); K/V are still written through ``meta``'s page table.
    ``kv_bytes_hook``: a backend's registered ``"tree_attention_kv_bytes"`` measurement, called with the
    same arguments as the attention of every layer; its results go to ``kv_bytes``.
    """

    meta: ForestMetadata
    cache: ForestKVCache | None = None
    token_node: Tensor | None = None
    token_pos: Tensor | None = None
    packed: bool = False
    backend: str = "auto"
    append_backend: str = "auto"
    validate: bool = True
    count_reads: bool = False
    kv_reads: list[int] = field(default_factory=list)
    attn_meta: ForestMetadata | None = None
    kv_bytes_hook: Callable[..., int] | None = None
    kv_bytes: list[int] = field(default_factory=list)
    group: Any = None  # packed: a torch.distributed group of size > 1 runs the attention context-parallel
    token_ranges: list[tuple[int, int]] | None = None  # ... with this rank's tokens token_ranges[rank]


def kv_elements_read(meta: ForestMetadata, per_group: bool) -> int:
    """Key tokens read by one attention call: every group's visible tokens (``per_group``: what a
    per-branch paged kernel, and the reference backend, gathers) or each visible node once (the
    forest's unique tokens, what a KV-partitioned kernel needs)."""
    lens = meta.node_len.long()
    has_rows = meta.q_lens() > 0
    cnt = (meta.vis_indptr[1:] - meta.vis_indptr[:-1]).long()
    gid = torch.repeat_interleave(torch.arange(meta.num_groups, device=meta.device), cnt)
    live = has_rows[gid]
    nodes = meta.vis_nodes.long()[live]
    if per_group:
        return int(lens[nodes].sum())
    return int(lens[torch.unique(nodes)].sum())


def unshared_metadata(meta: ForestMetadata) -> ForestMetadata:
    """The same attention with nothing shared between groups: every (group, listed node) pair gets its
    own node over the same pages. A KV-partitioned kernel then reads each group's context separately,
    which is what a per-branch paged kernel (vLLM / SGLang decode) reads. For baselines."""
    dev = meta.device
    src = meta.vis_nodes.long()  # [V]: the node each new node copies
    ip = meta.node_page_indptr.long()
    npg = (ip[1:] - ip[:-1])[src]
    new_ip = torch.zeros(src.numel() + 1, dtype=torch.long, device=dev)
    new_ip[1:] = torch.cumsum(npg, 0)
    total = int(new_ip[-1])
    j = torch.arange(total, device=dev) - torch.repeat_interleave(new_ip[:-1], npg, output_size=total)
    pages = meta.node_page_indices.long()[torch.repeat_interleave(ip[:-1][src], npg, output_size=total) + j]
    i32 = dict(dtype=torch.int32, device=dev)
    return ForestMetadata(
        node_page_indptr=new_ip.to(**i32), node_page_indices=pages.to(**i32),
        node_len=meta.node_len[src].to(**i32), qo_indptr=meta.qo_indptr, vis_indptr=meta.vis_indptr,
        vis_nodes=torch.arange(src.numel(), **i32), page_size=meta.page_size, own_full=meta.own_full)


def multiverse_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, scaling: float | None = None,
                         dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention function. query [1, Hq, T, D], key/value [1, Hk, T, D] (RoPE applied).

    Returns (out [1, T, Hq, D], None). Needs ``multiverse=ForestContext(...)`` in the model's forward.
    """
    ctx = kwargs.get("multiverse")
    if not isinstance(ctx, ForestContext):
        prev = _PREVIOUS.get(id(getattr(module, "config", None)))
        back = f"model.set_attn_implementation({prev or 'sdpa'!r})"
        raise ValueError(
            "multiverse: this model is switched to the 'multiverse' attention, which needs "
            "multiverse=ForestContext(...) in the model's forward (forest_forward / packed_forward pass it). "
            f"For an ordinary forward switch back with {back}; to switch only for a block of code use "
            "`with multiverse_kernels.integrations.transformers.use_multiverse_attention(model): ...`, "
            "which restores the previous attention on exit")
    if query.shape[0] != 1:
        raise ValueError(f"query: expected batch size 1 (the forest flattens branches into one row of "
                         f"tokens), got {query.shape[0]}")
    variant = attention_variant(kwargs, query)
    if dropout and module.training:
        raise NotImplementedError("dropout: attention dropout is not supported by the multiverse attention")
    if attention_mask is not None:
        raise ValueError("attention_mask: the multiverse attention takes its mask from the forest; pass none")
    T = query.shape[2]
    q = query[0].transpose(0, 1).contiguous()  # [T, Hq, D]
    k = key[0].transpose(0, 1).contiguous()  # [T, Hk, D]
    v = value[0].transpose(0, 1).contiguous()
    meta = ctx.meta
    ameta = meta if ctx.attn_meta is None else ctx.attn_meta
    sm = q.shape[-1] ** -0.5 if scaling is None else scaling
    if ctx.count_reads:
        ctx.kv_reads.append(kv_elements_read(ameta, per_group=True) * k.shape[1] * k.shape[2] * 2
                            * k.element_size())
    if ctx.packed:
        kc = k.view(T, 1, k.shape[1], k.shape[2])
        vc = v.view(T, 1, v.shape[1], v.shape[2])
        if ctx.kv_bytes_hook is not None:
            ctx.kv_bytes.append(int(ctx.kv_bytes_hook(q.detach(), kc.detach(), vc.detach(), ameta, sm)))
        if ctx.group is not None:  # context parallel: q, k, v are this rank's tokens of the packed sequence
            out = cp_tree_attention(q, k, v, ameta, group=ctx.group, token_ranges=ctx.token_ranges,
                                    sm_scale=sm, backend=ctx.backend, validate=ctx.validate, **variant)
            return out.unsqueeze(0), None
        # differentiable in q, k, v (tree_attention's autograd; the views pass gradients back to k, v)
        out = tree_attention(q, kc, vc, ameta, sm_scale=sm, backend=ctx.backend, validate=ctx.validate,
                             **variant)
        return out.unsqueeze(0), None
    if ctx.cache is None or ctx.token_node is None or ctx.token_pos is None:
        raise ValueError("multiverse: paged mode needs cache, token_node and token_pos in the ForestContext")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError("module: the attention module has no layer_idx; cannot pick its cache")
    kc, vc = ctx.cache.k[layer], ctx.cache.v[layer]
    append_paged_kv(k, v, kc, vc, meta.node_page_indptr, meta.node_page_indices, ctx.token_node,
                    ctx.token_pos, backend=ctx.append_backend, validate=ctx.validate)
    if ctx.kv_bytes_hook is not None:
        ctx.kv_bytes.append(int(ctx.kv_bytes_hook(q, kc, vc, ameta, sm)))
    out = tree_attention(q, kc, vc, ameta, sm_scale=sm, backend=ctx.backend, validate=ctx.validate,
                         **variant)
    return out.unsqueeze(0), None


# Keywords transformers' models pass to an attention function that need nothing from it here: the forest
# gives the mask and the positions (RoPE is applied before the call), the paged cache is ours.
_IGNORED_KWARGS = frozenset({"multiverse", "position_ids", "use_cache", "cache_position", "past_key_values",
                             "past_key_value", "is_causal", "layer_idx", "output_attentions"})


def attention_variant(kwargs: dict[str, Any], query: Tensor) -> dict[str, Any]:
    """The ``tree_attention`` keywords for what a transformers model passes its attention function:
    ``sliding_window`` -> ``window`` (transformers: a key is visible iff ``q_pos - k_pos < W``, the same
    rule, here over the forest's positions), ``softcap`` -> ``softcap`` (Gemma 2), ``s_aux`` ->
    ``sinks`` (GPT-OSS's per-head sink logits, differentiable). Any other keyword with a value (not None,
    not False) raises NotImplementedError naming it: nothing a model passes is dropped silently."""
    out: dict[str, Any] = {}
    for key, val in kwargs.items():
        if key == "is_causal" and val is False:  # bidirectional attention: the forest would make it causal
            raise NotImplementedError("is_causal=False: the multiverse attention is causal within a node "
                                      "(a fully visible own node is ForestMetadata.own_full)")
        if val is None or val is False or key in _IGNORED_KWARGS:
            if key == "output_attentions" and val:
                raise NotImplementedError("output_attentions: the multiverse attention returns no weights")
            continue
        if key == "sliding_window":
            out["window"] = int(val)
        elif key == "softcap":
            out["softcap"] = float(val)
        elif key == "s_aux":
            sinks = val if isinstance(val, Tensor) else torch.as_tensor(val)
            out["sinks"] = sinks.to(torch.float64 if query.dtype == torch.float64 else torch.float32)
        else:
            raise NotImplementedError(
                f"{key}: the multiverse attention does not implement this keyword of the model's attention "
                f"call (got {type(val).__name__}); it implements sliding_window, softcap and s_aux")
    return out


def register(name: str = ATTN_NAME) -> str:
    """Register :func:`multiverse_attention` with ``transformers.AttentionInterface`` under ``name``.
    Then ``model.set_attn_implementation(name)``. Returns ``name``."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, multiverse_attention)
    return name


# id(config) -> the attention implementation a model had before it was switched (for error messages).
_PREVIOUS: dict[int, str] = {}


@contextlib.contextmanager
def use_multiverse_attention(model: Any) -> Iterator[Any]:
    """Switch ``model`` to the "multiverse" attention for the ``with`` block; the previous
    implementation (e.g. "sdpa") is restored on exit, also on an exception. Nested use and a model that
    is already switched are fine (then nothing changes on exit). Inside, call the model with
    ``multiverse=ForestContext(...)`` (or :func:`forest_forward` / :func:`packed_forward`, which then skip
    their own switching). Training with gradient checkpointing needs the forward *and* the backward
    inside the block (checkpointing re-runs the attention during backward)."""
    prev = getattr(model.config, "_attn_implementation", None)
    if prev == ATTN_NAME:
        yield model
        return
    register()
    model.set_attn_implementation(ATTN_NAME)
    _PREVIOUS[id(model.config)] = prev or "sdpa"
    for m in model.modules():  # attention modules may hold sub-configs (multimodal models)
        cfg = getattr(m, "config", None)
        if cfg is not None and cfg is not model.config:
            _PREVIOUS.setdefault(id(cfg), prev or "sdpa")
    try:
        yield model
    finally:
        model.set_attn_implementation(prev or "sdpa")


def _scoped(model: Any) -> contextlib.AbstractContextManager:
    if getattr(model.config, "_attn_implementation", None) == ATTN_NAME:
        return contextlib.nullcontext(model)
    # transformers >= 5.24 renamed is_gradient_checkpointing (deprecated: a FutureWarning)
    name = ("is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    if getattr(model, name, False) and model.training and torch.is_grad_enabled():
        raise ValueError(
            "model: gradient checkpointing re-runs the attention during backward, after this call has "
            "restored the model's previous attention; wrap forward and backward in "
            "`with use_multiverse_attention(model): ...`")
    return use_multiverse_attention(model)


def cache_kwarg(model: Any) -> str:
    """The name of the KV-cache keyword of ``model``'s forward: ``"cache"`` where transformers has it
    (``past_key_values`` is deprecated there, a FutureWarning), else ``"past_key_values"``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def forest_forward(model: Any, input_ids: Tensor, position_ids: Tensor, meta: ForestMetadata,
                   cache: ForestKVCache, token_node: Tensor, token_pos: Tensor, *, backend: str = "auto",
                   append_backend: str = "auto", validate: bool = True,
                   logits_rows: Tensor | None = None, ctx: ForestContext | None = None,
                   attn_meta: ForestMetadata | None = None) -> Tensor:
    """One paged forward pass (prefill, extend or decode) over a forest.

    Args:
        model: a transformers causal LM (switched to the "multiverse" attention for this call and back
            afterwards, unless it is switched already, e.g. inside :func:`use_multiverse_attention`).
        input_ids, position_ids: int64 [T], in the order of ``meta``'s query rows.
        meta: the step's metadata; group g's rows are the last q_len tokens of its own node, just
            allocated (e.g. by :meth:`KVForest.append`).
        cache: per-layer paged caches; token_node/token_pos int32 [T]: where each new token's K/V go.
        logits_rows: int64 rows whose logits to return (default: all).
        ctx: pass a :class:`ForestContext` to reuse (its meta/cache/tokens are overwritten) or to count
            or measure reads.
        attn_meta: metadata for the attention only (see :class:`ForestContext`).
    Returns:
        logits [T or len(logits_rows), vocab].
    """
    if ctx is None:
        ctx = ForestContext(meta)
    ctx.meta, ctx.cache, ctx.token_node, ctx.token_pos, ctx.packed = meta, cache, token_node, token_pos, False
    ctx.backend, ctx.append_backend, ctx.validate = backend, append_backend, validate
    ctx.attn_meta = attn_meta
    if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
        raise ValueError(f"input_ids/position_ids: expected two [T] tensors, got {tuple(input_ids.shape)} "
                         f"and {tuple(position_ids.shape)}")
    keep = 0 if logits_rows is None else logits_rows  # transformers' logits_to_keep: 0 = all rows
    with _scoped(model):
        return model(input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False,
                     logits_to_keep=keep, multiverse=ctx).logits[0]


def packed_forward(model: Any, structure: Any, *, backend: str = "auto", validate: bool = True,
                   meta: ForestMetadata | None = None, group: Any = None,
                   token_ranges: list[tuple[int, int]] | None = None) -> Tensor:
    """Logits [L, vocab] of one packed Multiverse sequence (a :class:`MultiverseStructure`), with
    Multiverse positions and attention, no dense mask. Differentiable through ``tree_attention``'s
    autograd (memory-bounded blocked backward, no L x L object; see module docstring). The model's
    attention is switched for this call only (see :func:`use_multiverse_attention`).

    ``group``: a ``torch.distributed`` process group of size > 1 runs the model context-parallel: this
    rank feeds only its tokens ``token_ranges[rank]`` (default: an even split) and gets their logits
    ``[end - start, vocab]``; the attention is :func:`multiverse_kernels.distributed.tree_attention`."""
    ids = structure.token_ids.to(model.device)
    if meta is None:
        meta = structure.metadata(ids.device)
    pos = structure.position_ids.to(ids.device)
    if group is not None:
        if dist.get_world_size(group) > 1:
            if token_ranges is None:
                token_ranges = even_token_ranges(ids.numel(), dist.get_world_size(group))
            s, e = token_ranges[dist.get_rank(group)]
            ids, pos = ids[s:e], pos[s:e]
        else:
            group = None
    ctx = ForestContext(meta, packed=True, backend=backend, validate=validate, group=group,
                        token_ranges=token_ranges)
    with _scoped(model):
        return model(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                     multiverse=ctx).logits[0]


def kv_bytes_hook(backend: str, device: torch.device | str) -> tuple[str, Callable[..., int] | None]:
    """The backend ``backend`` resolves to on ``device`` ("auto": the fastest available) and its
    registered ``"tree_attention_kv_bytes"`` measurement hook, or None if it registers none."""
    dev = torch.device(device)
    name = available_backends("tree_attention", dev)[0] if backend == "auto" else backend
    if name in available_backends("tree_attention_kv_bytes", dev):
        return name, resolve("tree_attention_kv_bytes", name, dev)
    return name, None
