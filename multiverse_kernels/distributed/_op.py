"""``multiverse_kernels.distributed.tree_attention``: context-parallel tree attention (see the package
docstring)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor

from ..metadata import ForestMetadata, MetadataError
from ..ops import tree_attention as _local_tree_attention
from ..ops.tree_attention import add_sinks
from ..variants import FP8_DTYPES, Variant, check_variant
from ._exchange import Attach, agree, comm_device, start_fetch
from ._plan import HostForest, RankPlan, check_token_ranges, host_forest, rank_plan

__all__ = ["tree_attention"]

_FORESTS: OrderedDict = OrderedDict()   # identity of the metadata tensors -> (copy, HostForest)
_PLANS: OrderedDict = OrderedDict()     # (digest, ranges, rank, device) -> RankPlan
_LOCK = threading.Lock()
_CACHE_SIZE = 8


def _meta_tensors(meta: ForestMetadata) -> tuple[Tensor, ...]:
    """Every tensor the host forest depends on (positions included: windows measure in them)."""
    return tuple(meta.tensors()) + tuple(t for t in (meta.own_full, meta.node_pos) if t is not None)


def _identity(meta: ForestMetadata) -> tuple:
    return (meta.page_size, meta.own_full is None, meta.node_pos is None) + tuple(
        (id(t), t.data_ptr(), t._version if not t.is_inference() else -1) for t in _meta_tensors(meta))


def _cached_forest(meta: ForestMetadata) -> HostForest:
    if not isinstance(meta, ForestMetadata):
        raise MetadataError(f"meta: expected a ForestMetadata, got {type(meta).__name__}")
    key = _identity(meta)
    with _LOCK:
        hit = _FORESTS.get(key)
    if hit is not None:
        copy, f = hit
        # CPU metadata: compare contents (cheap) so an in-place change behind torch's back is not missed
        if meta.device.type != "cpu" or all(torch.equal(a, b) for a, b in zip(copy, _meta_tensors(meta))):
            return f
    f = host_forest(meta)
    with _LOCK:
        copy = tuple(t.clone() for t in _meta_tensors(meta)) if meta.device.type == "cpu" else ()
        _FORESTS[key] = (copy, f)
        while len(_FORESTS) > _CACHE_SIZE:
            _FORESTS.popitem(last=False)
    return f


def _cached_plan(f: HostForest, ranges: list[tuple[int, int]], rank: int, device: torch.device,
                 window: int | None) -> RankPlan:
    key = (f.digest, tuple(ranges), rank, str(device), window)
    with _LOCK:
        p = _PLANS.get(key)
    if p is None:
        # a windowed call runs the combined forest only (the remote-only one cannot carry positions)
        p = rank_plan(f, ranges, rank, device, window=window,
                      forests=("combined",) if window is not None else ("local", "remote", "combined"))
        with _LOCK:
            _PLANS[key] = p
            while len(_PLANS) > _CACHE_SIZE:
                _PLANS.popitem(last=False)
    return p


def _check_tensors(q: Tensor, k: Tensor, v: Tensor, s: int, e: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise MetadataError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise MetadataError(f"{name}: expected a 3-D tensor [tokens, heads, head_dim] (this rank's slice "
                                f"of the packed sequence), got shape {tuple(t.shape)}")
        if t.shape[0] != e - s:
            raise MetadataError(f"{name}: expected {e - s} rows (this rank's token range [{s}, {e})), got "
                                f"{t.shape[0]}")
    if k.shape != v.shape:
        raise MetadataError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    fp8 = k.dtype in FP8_DTYPES  # an fp8 cache: check_variant checks the dtypes and scales
    if q.shape[2] != k.shape[2] or (not fp8 and (q.dtype != k.dtype or q.dtype != v.dtype)) \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise MetadataError(f"k: expected q's dtype {q.dtype} (or an fp8 dtype with k_scale / v_scale) and "
                            f"head dim {q.shape[2]} and a head count dividing q's {q.shape[1]}, got "
                            f"{k.dtype}, {tuple(k.shape)}")


def _merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Log-sum-exp merge of two partial states of the same rows (differentiable; both lse finite)."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse)[..., None]
    wb = torch.exp(lse_b - lse)[..., None]
    acc = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    return (wa * out_a.to(acc) + wb * out_b.to(acc)).to(out_a.dtype), lse


def _variant_key(var: Variant) -> tuple:
    """What every rank must agree on about the variant (the sinks' and scales' values are not compared:
    that would need a device sync; they are replicated parameters)."""
    def desc(t):
        return None if t is None else (str(t.dtype), tuple(t.shape))
    return (var.window, None if var.softcap is None else float(var.softcap), desc(var.sinks),
            desc(var.k_scale), desc(var.v_scale))


def _cat(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype in FP8_DTYPES:  # as bytes: concatenation of fp8 tensors is not on every device
        return torch.cat([a.view(torch.uint8), b.view(torch.uint8)]).view(a.dtype)
    return torch.cat([a, b])


def tree_attention(q: Tensor, k: Tensor, v: Tensor, meta: ForestMetadata, *, group=None,
                   token_ranges=None, sm_scale: float | None = None, return_lse: bool = False,
                   backend: str = "auto", validate: bool = True, overlap: bool | None = None,
                   window: int | None = None, softcap: float | None = None, sinks: Tensor | None = None,
                   k_scale: Tensor | None = None, v_scale: Tensor | None = None):
    """Tree attention over a packed forest whose tokens are split across the ranks of ``group``.

    Args:
        q: [n_r, Hq, D], k, v: [n_r, Hk, D]: this rank's tokens ``[start, end)`` of the packed sequence.
        meta: the whole packed forest (rows = tokens, page size 1: ``MultiverseStructure.metadata()``,
            ``PackedRollouts.metadata()``), the same on every rank (``node_pos`` included).
        group: the ``torch.distributed`` process group (None: the default group). gloo (CPU tensors) or
            NCCL (CUDA tensors).
        token_ranges: every rank's ``(start, end)``, tiling ``[0, L)`` in rank order (None: an even split,
            the last rank taking the remainder; :func:`balanced_token_ranges` balances the work).
        sm_scale, backend: as :func:`multiverse_kernels.tree_attention` (``backend`` runs the local calls).
        return_lse: also return lse [n_r, Hq] float32.
        validate: check the inputs and that every rank passes the same metadata, ranges, shapes, dtype and
            variant (one all-gather of two int64 per rank per call); bad input raises MetadataError on
            every rank. With ``validate=False`` a rank with bad input raises alone and the others block in
            the exchange until the group's timeout.
        overlap: True: attend to the own K/V while the remote slices are in flight, then to the fetched
            ones, and merge the two partial states by log-sum-exp; False: one call over
            ``cat(own, fetched)`` after the exchange. None: True except for float64 (lse is float32, so the
            merge would bound float64 accuracy to ~1e-7) and with ``window`` (a windowed call always runs
            the one call: the remote-only forest cannot carry the rows' positions; ``overlap`` is then
            ignored).
        window, softcap, sinks, k_scale, v_scale: the attention variants of
            :func:`multiverse_kernels.tree_attention` (docs/design.md, "Attention variants"), with the
            same meaning on the whole forest:

            * ``window``: distances in the whole forest's positions (``meta.node_pos``, else
              :meth:`~multiverse_kernels.ForestMetadata.default_node_pos` of the whole forest, never of a
              rank's slice); only the keys inside some local row's window are fetched.
            * ``softcap``: per score, so every local call applies it.
            * ``sinks`` float32 [Hq], the same on every rank: added once per row after the row's partial
              states are merged; ``lse`` includes it. Its gradient on each rank is the contribution of
              that rank's rows, like every parameter gradient under context parallelism: the sum over the
              ranks is the single-process gradient, so all-reduce it with the other parameter gradients
              (as DDP / FSDP over the context-parallel group do); the op itself does not reduce it.
            * fp8 ``k``/``v`` with ``k_scale``/``v_scale`` (float16 / bfloat16 q): forward only, as in the
              single-process op (the backward raises NotImplementedError); the fp8 bytes are exchanged.

    Returns:
        out [n_r, Hq, D] (and lse). Differentiable in q, k, v (and sinks): the dK/dV of fetched tokens are
        sent back to the rank that owns them. Every rank must run the backward (they exchange gradients).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("multiverse_kernels.distributed.tree_attention: torch.distributed is not "
                           "initialized (call torch.distributed.init_process_group first)")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    var = Variant(window, softcap, sinks, k_scale, v_scale)
    error, key, f, ranges = None, 0, None, None
    try:
        f = _cached_forest(meta)
        ranges = check_token_ranges(token_ranges, f.num_tokens, world)
        s, e = ranges[rank]
        _check_tensors(q, k, v, s, e)
        check_variant(var, q, k[:, None], v[:, None])
        if sm_scale is None:
            sm_scale = q.shape[-1] ** -0.5
        h = hashlib.blake2b(f.digest, digest_size=8)
        h.update(repr((ranges, q.shape[1], k.shape[1], q.shape[2], str(q.dtype), str(k.dtype),
                       float(sm_scale), _variant_key(var))).encode())
        key = int.from_bytes(h.digest(), "little") >> 1
    except (MetadataError, ValueError, TypeError) as ex:
        error = f"{type(ex).__name__}: {ex}"
    if validate and world > 1:
        like = q.device if isinstance(q, Tensor) else torch.device("cpu")
        agree(group, key, error, comm_device(group, like))
    elif error is not None:
        raise MetadataError(error)
    n_r, hk, d = k.shape
    fp8 = k.dtype in FP8_DTYPES
    kw = dict(sm_scale=sm_scale, backend=backend, validate=False, softcap=softcap, k_scale=k_scale,
              v_scale=v_scale)
    if world == 1:  # the local op
        return _local_tree_attention(q, k.view(n_r, 1, hk, d), v.view(n_r, 1, hk, d), meta,
                                     return_lse=return_lse, window=window, sinks=sinks, **kw)
    plan = _cached_plan(f, ranges, rank, q.device, window)
    recv, work = start_fetch(k, v, plan.send_idx, plan.send_splits, plan.recv_splits, group)
    if window is not None:
        overlap = False
    elif overlap is None:
        overlap = q.dtype != torch.float64
    out = lse = None
    if overlap and n_r > 0:  # own keys while the exchange is in flight
        out, lse = _local_tree_attention(q, k.view(n_r, 1, hk, d), v.view(n_r, 1, hk, d), plan.local,
                                         return_lse=True, **kw)
    work.wait()
    if fp8:  # forward only: nothing to send back
        kf, vf = recv[:, 0].contiguous(), recv[:, 1].contiguous()
    else:
        kf, vf = Attach.apply(k, v, recv, plan.send_idx, plan.send_splits, plan.recv_splits, group)
    nf = plan.num_fetched
    sinks_added = False
    if n_r == 0:
        out, lse = q * 0, q.sum(-1).float() * 0  # empty, still connected to q (dq = [0, Hq, D])
    elif overlap:
        if plan.remote is not None:
            rows = plan.remote_rows
            ob, lb = _local_tree_attention(q[rows], kf.view(nf, 1, hk, d), vf.view(nf, 1, hk, d),
                                           plan.remote, return_lse=True, **kw)
            om, lm = _merge(out[rows], lse[rows], ob, lb)
            out, lse = out.index_copy(0, rows, om), lse.index_copy(0, rows, lm)
    else:
        # one call: the sinks (and the window, over the combined forest's positions) go to the local op
        kc, vc = _cat(k, kf).view(n_r + nf, 1, hk, d), _cat(v, vf).view(n_r + nf, 1, hk, d)
        out, lse = _local_tree_attention(q, kc, vc, plan.combined, return_lse=True, window=window,
                                         sinks=sinks, **kw)
        sinks_added = True
    if sinks is not None and not sinks_added:
        # once per row, after its partial states are merged (exact: the sink is in the denominator only);
        # differentiable, so each rank's sinks gradient is its rows' contribution
        out, lse = add_sinks(out, lse, sinks)
    if (nf == 0 or n_r == 0) and torch.is_grad_enabled() and (kf.requires_grad or vf.requires_grad):
        # keep the reverse exchange in this rank's backward even when no local row reads a fetched key:
        # the other ranks' gradients for this rank's keys arrive through it
        z = (kf.sum() + vf.sum()) * 0
        out, lse = out + z.to(out.dtype), lse + z.to(lse.dtype)
    return (out, lse) if return_lse else out
