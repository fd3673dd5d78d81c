"""What a user would otherwise run, and how bytes read are measured.

Peers of ``tree_attention`` on one :class:`~multiverse_kernels.bench.workloads.Workload` step:

* **dense-mask SDPA**: gather every forest token once, one SDPA with a [rows, L] bool mask;
* **FlexAttention (compiled)**: the same gathered keys with a node-level ``mask_mod``;
* **per-branch paged decode**: each query group attends its own full page list (the prefix re-read by
  every branch), as engines run Multiverse paths today.

KV bytes are measured, not derived: a backend that registers a ``tree_attention_kv_bytes`` hook counts
its own loads; for PyTorch-level methods :class:`CacheReadCounter` (a dispatch mode) tallies the bytes
every aten op reads from tensors aliasing the cache storage (index ops count the elements they fetch).

:func:`methods` is the one list of timed methods (every ``tree_attention`` backend asked for, then the
peers) used by the main job, the sweeps and the ncu table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.utils._python_dispatch import TorchDispatchMode

from ..backends import _IMPLS, available_backends, resolve
from ..dense_mask import dense_mask, key_slots
from ..ops.tree_attention import tree_attention
from .workloads import Workload, key_and_row_positions

__all__ = ["CacheReadCounter", "measure_bytes", "dense_sdpa_peer", "flex_peer", "per_branch_peer", "PEERS",
           "Method", "methods", "tree_backends"]

_aten = torch.ops.aten
_VIEW_OPS = {
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.transpose.int,
    _aten.permute.default, _aten.slice.Tensor, _aten.select.int, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.expand.default, _aten.as_strided.default, _aten.alias.default,
    _aten.t.default, _aten.detach.default, _aten.unbind.int, _aten.split.Tensor,
    _aten.lift_fresh.default,
}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_select.default, _aten.gather.default,
              _aten.embedding.default}


class CacheReadCounter(TorchDispatchMode):
    """Tally the bytes aten ops read from tensors whose storage is one of ``caches``.

    Views read nothing; index/gather ops read what they return; any other op reads its whole argument.
    """

    def __init__(self, *caches: Tensor) -> None:
        super().__init__()
        self._ptrs = {c.untyped_storage().data_ptr() for c in caches}
        self.bytes = 0

    def _is_cache(self, t: object) -> bool:
        return isinstance(t, Tensor) and t.untyped_storage().data_ptr() in self._ptrs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = list(args) + list(kwargs.values())
        flat = [x for a in flat for x in (a if isinstance(a, (list, tuple)) else [a])]
        hits = [a for a in flat if self._is_cache(a)]
        if hits and func not in _VIEW_OPS:
            if func in _INDEX_OPS:
                self.bytes += out.numel() * out.element_size()
            else:
                self.bytes += sum(a.numel() * a.element_size() for a in hits)
        return out


def _dequantized(w: Workload, x: Tensor, scale_key: str) -> Tensor:
    """Gathered K or V [T, Hk, D] as the queries' dtype (fp8 caches times their scale: what a user of an
    fp8 cache without an fp8 kernel does, inside the timed step)."""
    sc = w.variant.get(scale_key)
    if sc is None:
        return x
    return (x.float() * sc.reshape(-1, 1)).to(w.q.dtype)


def measure_bytes(fn: Callable[[], object], w: Workload) -> int:
    """Bytes ``fn()`` reads from ``w``'s K/V caches (aten-level tally)."""
    with CacheReadCounter(w.k_cache, w.v_cache) as c:
        fn()
    return c.bytes


# ---------------------------------------------------------------------------------------------- peers
def dense_sdpa_peer(w: Workload) -> Callable[[], Tensor]:
    """Dense-mask SDPA: gather every forest token once, one SDPA with a [rows, L] bool mask (built once
    per step outside the timed region, as it would be reused by every layer)."""
    mask = dense_mask(w.meta)
    if "window" in w.variant:
        kpos, rpos = key_and_row_positions(w.meta)
        mask = mask & ((rpos[:, None] - kpos[None, :]) < w.variant["window"])
    slots = key_slots(w.meta)
    hq, hk = w.q.shape[1], w.k_cache.shape[2]

    def run() -> Tensor:
        k = _dequantized(w, w.k_cache.reshape(-1, hk, w.k_cache.shape[-1])[slots], "k_scale").transpose(0, 1)
        v = _dequantized(w, w.v_cache.reshape(-1, hk, w.v_cache.shape[-1])[slots], "v_scale").transpose(0, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            w.q.transpose(0, 1), k, v, attn_mask=mask, enable_gqa=hq != hk)
        return out.transpose(0, 1)

    return run


def flex_peer(w: Workload) -> Callable[[], Tensor]:
    """Compiled FlexAttention over the gathered forest with a node-level mask_mod: key t belongs to
    node kv_node[t]; row r sees it if its group lists that node (a [groups, nodes] table), causally
    within its own node."""
    m = w.meta
    dev = w.q.device
    slots = key_slots(m)
    lens = m.node_len.long()
    kv_node = torch.repeat_interleave(torch.arange(m.num_nodes, device=dev), lens)
    kv_pos = torch.arange(slots.numel(), device=dev) - (torch.cumsum(lens, 0) - lens)[kv_node]
    q_lens = m.q_lens().long()
    row_group = torch.repeat_interleave(torch.arange(m.num_groups, device=dev), q_lens)
    own = m.own_nodes()
    row_i = torch.arange(m.total_q, device=dev) - m.qo_indptr.long()[row_group]
    row_limit = lens[own[row_group]] - q_lens[row_group] + row_i  # last visible own position
    table = torch.zeros(m.num_groups, m.num_nodes, dtype=torch.bool, device=dev)
    gid = torch.repeat_interleave(torch.arange(m.num_groups, device=dev),
                                  (m.vis_indptr[1:] - m.vis_indptr[:-1]).long())
    table[gid, m.vis_nodes.long()] = True
    row_own = own[row_group]
    window = w.variant.get("window")
    kabs, rabs = key_and_row_positions(w.meta) if window is not None else (None, None)

    def mask_mod(b, h, qi, ki):
        n = kv_node[ki]
        visible = table[row_group[qi], n]
        visible = visible & ((n != row_own[qi]) | (kv_pos[ki] <= row_limit[qi]))
        if window is not None:
            visible = visible & (rabs[qi] - kabs[ki] < window)
        return visible

    block_mask = create_block_mask(mask_mod, None, None, m.total_q, slots.numel(), device=dev)
    # dynamic=False: a static compile per forest (torch 2.14.1 inductor generates C++ that does not compile
    # for the dynamic-shape recompile of a second forest: "cur_qSplitSize9 was not declared")
    flex = torch.compile(flex_attention, dynamic=False)
    hk = w.k_cache.shape[2]

    def gather() -> tuple[Tensor, Tensor]:
        k = _dequantized(w, w.k_cache.reshape(-1, hk, w.k_cache.shape[-1])[slots], "k_scale")
        v = _dequantized(w, w.v_cache.reshape(-1, hk, w.v_cache.shape[-1])[slots], "v_scale")
        return k.transpose(0, 1)[None], v.transpose(0, 1)[None]

    def run() -> Tensor:
        k, v = gather()
        out = flex(w.q.transpose(0, 1)[None], k, v, block_mask=block_mask, enable_gqa=True)
        return out[0].transpose(0, 1)

    run.cache_reads = gather  # the compiled kernel reads only the gathered copy
    return run


def per_branch_peer(w: Workload) -> Callable[[], Tensor]:
    """Per-branch paged decode: each group is its own request over its full page list (prefix
    re-read by every branch), attention over the gathered list."""
    m = w.meta
    hq, hk = w.q.shape[1], w.k_cache.shape[2]
    qo, vi, vis = m.qo_indptr.tolist(), m.vis_indptr.tolist(), m.vis_nodes.tolist()
    window = w.variant.get("window")
    pos = m.positions().long() if window is not None else None
    reqs = []
    for g in range(m.num_groups):
        if qo[g + 1] == qo[g]:
            continue
        nodes = vis[vi[g]:vi[g + 1]]
        slots = torch.cat([m.node_token_slots(n) for n in nodes])
        ql = qo[g + 1] - qo[g]
        L = slots.numel()
        ar = torch.arange(L, device=slots.device)
        causal = ar[None] <= (L - ql + ar[:ql])[:, None]
        if window is not None:  # the forest's positions (a Multiverse conclusion: after the longest path)
            kp = torch.cat([pos[n] + torch.arange(int(m.node_len[n]), device=pos.device) for n in nodes])
            causal = causal & ((kp[-ql:][:, None] - kp[None, :]) < window)
        reqs.append((qo[g], qo[g + 1], slots, causal))

    def run() -> Tensor:
        out = torch.empty_like(w.q)
        kf = w.k_cache.reshape(-1, hk, w.k_cache.shape[-1])
        vf = w.v_cache.reshape(-1, hk, w.v_cache.shape[-1])
        for q0, q1, slots, causal in reqs:
            k = _dequantized(w, kf[slots], "k_scale")
            v = _dequantized(w, vf[slots], "v_scale")
            o = torch.nn.functional.scaled_dot_product_attention(
                w.q[q0:q1].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=causal, enable_gqa=hq != hk)
            out[q0:q1] = o.transpose(0, 1)
        return out

    return run


PEERS: dict[str, Callable[[Workload], Callable[[], Tensor]]] = {
    "dense-mask SDPA": dense_sdpa_peer,
    "FlexAttention (compiled)": flex_peer,
    "per-branch paged decode": per_branch_peer,
}


# ---------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """One timed method: ``build()`` returns the zero-argument step (a peer builds its mask or compiles
    here, so a peer that cannot run fails in ``build``); ``kv_bytes(step)`` measures what it reads."""

    name: str
    build: Callable[[], Callable[[], object]]
    kv_bytes: Callable[[Callable[[], object]], int]
    note: str
    is_peer: bool


def _counts_variant(fn, w: Workload) -> bool:
    """Whether a backend's byte counter takes every keyword of the step's variant (e.g. ``window=``)."""
    return fn is not None and set(w.variant) <= set(inspect.signature(fn).parameters)


def tree_backends(device: torch.device | str, requested: list[str] | None = None,
                  include_reference: bool = False) -> list[str]:
    """The ``tree_attention`` backends to time on ``device``: ``requested``, or every available one but
    the Triton interpreter on the CPU (a correctness tool) and, unless ``include_reference``, the
    reference (the specification: seconds per call, not a fast path)."""
    device = torch.device(device)
    if requested:
        return list(requested)
    names = available_backends("tree_attention", device)
    if device.type == "cpu":
        names = [b for b in names if b != "triton"]
    if not include_reference:
        names = [b for b in names if b != "reference"]
    return names


def methods(w: Workload, backends: Iterable[str], peers: Iterable[str] = tuple(PEERS)) -> list[Method]:
    """``tree_attention[<backend>]`` for each of ``backends``, then each of ``peers`` (names in
    :data:`PEERS`), on the step ``w``."""
    dev = w.q.device
    scale = w.q.shape[-1] ** -0.5
    out = []
    for b in backends:
        step = lambda b=b: tree_attention(w.q, w.k_cache, w.v_cache, w.meta, backend=b, validate=False,
                                          **w.variant)
        hook = _IMPLS.get("tree_attention_kv_bytes", {}).get(b)
        if w.variant and not _counts_variant(hook[0] if hook else None, w):
            out.append(Method(f"tree_attention[{b}]", lambda step=step: step, lambda _step: None,
                              "bytes not measured: the backend's counter takes no variant", False))
            continue
        if hook is not None and dev.type in hook[1]:
            kv = lambda _step, b=b: int(resolve("tree_attention_kv_bytes", b, dev)(
                w.q, w.k_cache, w.v_cache, w.meta, scale, **w.variant))
            note = "kernel's own load counter"
        else:  # run the implementation itself under the tally (the custom op is opaque to it)
            impl = resolve("tree_attention", b, dev)
            kv = lambda _step, impl=impl: measure_bytes(
                lambda: impl(w.q, w.k_cache, w.v_cache, w.meta, scale), w)
            note = "aten-level read tally"
        out.append(Method(f"tree_attention[{b}]", lambda step=step: step, kv, note, False))
    for name in peers:
        make = PEERS[name]
        out.append(Method(name, lambda make=make: make(w),
                          lambda step: measure_bytes(getattr(step, "cache_reads", step), w),
                          "aten-level read tally", True))
    return out
