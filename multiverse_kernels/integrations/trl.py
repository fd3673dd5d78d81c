"""Tree-packed RL training inside TRL (``trl>=1.16``): a drop-in for TRL's tree attention that never copies
the prompt, and a ``GRPOTrainer`` that forwards each group's prompt once (docs/training.md, "TRL").

**AsyncGRPOTrainer** packs each DP rank's samples into a prefix trie (``trl.experimental.async_grpo.packing
.TreeRow.pack()``) and loads the model with ``attn_implementation="tree_fa3"``. Its attention gathers, for
every segment of the trie, the K/V of the segment's whole root path (``key.index_select(0, tree_kv_index)``)
and runs FA3 varlen from a kernel-hub download: GPU only, no attention sinks, and the shared prompt is
copied once per segment below it. :func:`register` puts :func:`tree_attention_forward` under TRL's name::

    from multiverse_kernels.integrations import trl as mk_trl
    mk_trl.register()                  # before building AsyncGRPOTrainer; it then uses ours unchanged

It reads the same keywords (``tree_kv_index``, ``tree_cu_seqlens_q/_k``, ``tree_max_seqlen_q/_k``, plus
``scaling``, ``sliding_window``, ``softcap``, ``s_aux``) and turns segments into forest nodes and root
paths into visibility lists (:func:`tree_metadata`), with the packed K/V viewed as a page-size-1 cache:
nothing is gathered, every shared token is read in place. The metadata is built (and checked) once per
forward and reused by every layer. It runs on every backend of :func:`multiverse_kernels.tree_attention`
(CPU included) and is differentiable in q, k, v (and the sinks).

**GRPOTrainer**: :class:`MultiverseGRPOTrainer` is the stock trainer with the policy / reference /
old log-probs (and so the backward) computed over one packed forest per micro-batch: each group's prompt
is forwarded once and its completions are children that see it (``multiverse_kernels.rl``)::

    from multiverse_kernels.integrations.trl import MultiverseGRPOTrainer as GRPOTrainer

**Context parallelism**: ``register(group=g)`` with a group of more than one rank routes the attention to
:func:`multiverse_kernels.distributed.tree_attention`. Each rank feeds the model its slice
``token_ranges[rank]`` of the packed row (``input_ids``, ``position_ids``) and the tree keywords of the
*whole* row; TRL's layout is already a packed forest (page size 1, each segment's tokens consecutive,
row r = token r), which that op needs. Sliding windows (by the whole row's positions), soft-cap and sinks
pass through; each rank's sinks gradient is its rows' share (all-reduce it with the other parameters').
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from trl import GRPOTrainer

from ..distributed import even_token_ranges
from ..distributed import tree_attention as cp_tree_attention
from ..metadata import ForestMetadata, MetadataError
from ..ops import tree_attention
from ..rl import PackedRollouts, RolloutNode, pack_rollouts
from .transformers import attention_variant

__all__ = [
    "TRL_TREE_ATTENTION",
    "TREE_KEYWORDS",
    "register",
    "unregister",
    "tree_metadata",
    "tree_attention_forward",
    "gathered_kv_rows",
    "MultiverseGRPOTrainer",
    "pack_prompt_groups",
]

TRL_TREE_ATTENTION = "tree_fa3"  # trl.experimental.async_grpo.packing.TREE_ATTENTION
TREE_KEYWORDS = ("tree_kv_index", "tree_cu_seqlens_q", "tree_cu_seqlens_k", "tree_max_seqlen_q",
                 "tree_max_seqlen_k")


# ------------------------------------------------------------------------------------ TRL's tree -> forest
def _host(name: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name}: expected an integer tensor, got {type(t).__name__}") from e
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected a 1-D integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.int64)


def tree_metadata(tree_kv_index: Tensor, tree_cu_seqlens_q: Tensor, tree_cu_seqlens_k: Tensor,
                  num_tokens: int | None = None, *, tree_max_seqlen_q: int | None = None,
                  tree_max_seqlen_k: int | None = None,
                  device: torch.device | str | None = None) -> ForestMetadata:
    """The forest of TRL's packed tree (``TreeRow.pack()``), with every consistency check.

    TRL's layout: segment ``s`` is tokens ``cu_q[s]:cu_q[s+1]`` of the packed row and its root path is
    ``tree_kv_index[cu_k[s]:cu_k[s+1]]``: the tokens of its ancestors' segments, root first, then its
    own; FA3 runs it causally, bottom-right aligned (row i of the segment sees the path up to its own
    token). Here segment ``s`` is node ``s`` (its tokens are pages ``cu_q[s]..cu_q[s+1]-1`` of the packed
    K/V as a page-size-1 cache) and group ``s`` (its own rows), seeing the nodes its path is made of:
    the same attention, with nothing gathered. ``node_pos[s]`` is the depth of the segment's first token
    (TRL's position ids, and the distance FA3's sliding window counts in).

    Raises ValueError naming the keyword when ``tree_cu_seqlens_*`` are not monotonic, do not match each
    other, the row (``num_tokens``) or ``tree_kv_index``, an index is out of range, a path is not a
    chain of whole segments ending with its own, or ``tree_max_seqlen_*`` is smaller than a segment.
    """
    kv = _host("tree_kv_index", tree_kv_index)
    cu_q = _host("tree_cu_seqlens_q", tree_cu_seqlens_q)
    cu_k = _host("tree_cu_seqlens_k", tree_cu_seqlens_k)
    for name, cu in (("tree_cu_seqlens_q", cu_q), ("tree_cu_seqlens_k", cu_k)):
        if cu.numel() < 2 or int(cu[0]) != 0:
            raise ValueError(f"{name}: expected [0, ...] with one boundary per segment plus one (at least "
                             f"one segment), got {cu.tolist()[:8]}")
        if bool((cu[1:] < cu[:-1]).any()):
            bad = int(torch.nonzero(cu[1:] < cu[:-1])[0, 0]) + 1
            raise ValueError(f"{name}: not monotonic (entry {bad}: {int(cu[bad])} < {int(cu[bad - 1])})")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"tree_cu_seqlens_k: expected one boundary per segment like tree_cu_seqlens_q "
                         f"({cu_q.numel()}), got {cu_k.numel()}")
    qlen, klen = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    if bool((qlen == 0).any()):
        raise ValueError(f"tree_cu_seqlens_q: segment {int(torch.nonzero(qlen == 0)[0, 0])} is empty")
    L = int(cu_q[-1])
    if num_tokens is not None and L != num_tokens:
        raise ValueError(f"tree_cu_seqlens_q: the segments cover {L} tokens, the packed row has {num_tokens}")
    if int(cu_k[-1]) != kv.numel():
        raise ValueError(f"tree_cu_seqlens_k: ends at {int(cu_k[-1])}, tree_kv_index has {kv.numel()} "
                         "entries")
    if kv.numel() and (int(kv.min()) < 0 or int(kv.max()) >= L):
        bad = int(torch.nonzero((kv < 0) | (kv >= L))[0, 0])
        raise ValueError(f"tree_kv_index: entry {bad} = {int(kv[bad])} is out of range [0, {L})")
    if bool((klen < qlen).any()):
        s = int(torch.nonzero(klen < qlen)[0, 0])
        raise ValueError(f"tree_cu_seqlens_k: path {s} has {int(klen[s])} keys, fewer than the "
                         f"{int(qlen[s])} tokens of its segment")
    for name, given, actual in (("tree_max_seqlen_q", tree_max_seqlen_q, qlen),
                                ("tree_max_seqlen_k", tree_max_seqlen_k, klen)):
        if given is not None and int(given) < int(actual.max()):
            raise ValueError(f"{name}: {int(given)} is less than the longest segment/path "
                             f"({int(actual.max())})")
    S = qlen.numel()
    # decompose every path into whole segments: an entry that is the first token of its segment starts one
    seg = torch.searchsorted(cu_q[1:], kv, right=True)  # segment holding each gathered token
    path = torch.repeat_interleave(torch.arange(S), klen)  # path (segment) each entry belongs to
    starts = kv == cu_q[seg]
    vis_nodes = seg[starts]
    counts = torch.zeros(S, dtype=torch.int64).index_add_(0, path[starts], torch.ones_like(vis_nodes))
    vis_indptr = torch.zeros(S + 1, dtype=torch.int64)
    vis_indptr[1:] = torch.cumsum(counts, 0)
    n = qlen[vis_nodes]
    recon_len = torch.zeros(S, dtype=torch.int64).index_add_(0, path[starts], n)
    total = int(n.sum())
    recon = (torch.repeat_interleave(cu_q[:-1][vis_nodes] - torch.cumsum(n, 0) + n, n, output_size=total)
             + torch.arange(total))
    if total != kv.numel() or not torch.equal(recon, kv) or not torch.equal(recon_len, klen):
        raise ValueError("tree_kv_index: a root path is not a chain of whole segments (each segment's "
                         "tokens tree_cu_seqlens_q[s]:tree_cu_seqlens_q[s+1], in order), so it is "
                         "inconsistent with tree_cu_seqlens_q / tree_cu_seqlens_k")
    own = vis_nodes[vis_indptr[1:] - 1]
    if not torch.equal(own, torch.arange(S)):
        s = int(torch.nonzero(own != torch.arange(S))[0, 0])
        raise ValueError(f"tree_kv_index: path {s} does not end with its own segment (it ends with segment "
                         f"{int(own[s])}); FA3's causal alignment puts a segment's own tokens last")
    i32 = dict(dtype=torch.int32)
    meta = ForestMetadata(
        node_page_indptr=cu_q.to(**i32), node_page_indices=torch.arange(L, **i32), node_len=qlen.to(**i32),
        qo_indptr=cu_q.to(**i32), vis_indptr=vis_indptr.to(**i32), vis_nodes=vis_nodes.to(**i32),
        page_size=1, node_pos=(klen - qlen).to(**i32))
    try:
        meta.validate(num_pages=L)
    except MetadataError as e:  # e.g. a segment listed twice on one path
        raise ValueError(f"tree_kv_index: the paths do not form a forest ({e})") from e
    return meta if device is None else meta.to(device)


def gathered_kv_rows(tree_cu_seqlens_k: Tensor) -> int:
    """K/V rows TRL's FA3 attention gathers per layer (``len(tree_kv_index)``); ours gathers none."""
    return int(tree_cu_seqlens_k[-1])


def gather_tree_attention(q: Tensor, k: Tensor, v: Tensor, tree_kv_index: Tensor, tree_cu_seqlens_q: Tensor,
                          tree_cu_seqlens_k: Tensor, *, scaling: float | None = None,
                          sliding_window: int | None = None, softcap: float | None = None) -> Tensor:
    """TRL's tree attention semantics with a CPU varlen attention in place of FA3 (a baseline for tests
    and benchmarks): gather every segment's root path ``k/v.index_select(0, tree_kv_index)``, then run
    each segment causally, bottom-right aligned, over its gathered path (SDPA, or an explicit softmax
    when a window or soft-cap is set). q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq, D]."""
    kg, vg = k.index_select(0, tree_kv_index), v.index_select(0, tree_kv_index)  # the copies TRL makes
    cq, ck = tree_cu_seqlens_q.tolist(), tree_cu_seqlens_k.tolist()
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    outs = []
    for s in range(len(cq) - 1):
        qs = q[cq[s]:cq[s + 1]].transpose(0, 1)  # [Hq, Q, D]
        ks = kg[ck[s]:ck[s + 1]].transpose(0, 1).repeat_interleave(rep, 0)
        vs = vg[ck[s]:ck[s + 1]].transpose(0, 1).repeat_interleave(rep, 0)
        Q, K = qs.shape[1], ks.shape[1]
        qi = torch.arange(Q, device=q.device)[:, None] + (K - Q)
        kj = torch.arange(K, device=q.device)[None]
        allowed = kj <= qi
        if sliding_window:
            allowed = allowed & (qi - kj < sliding_window)
        if softcap or sliding_window:
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            sc = (qs.to(acc) @ ks.to(acc).transpose(1, 2)) * scale
            if softcap:
                sc = softcap * torch.tanh(sc / softcap)
            o = torch.softmax(sc.masked_fill(~allowed, float("-inf")), -1) @ vs.to(acc)
            outs.append(o.to(q.dtype).transpose(0, 1))
        else:
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
            outs.append(o.transpose(0, 1))
    return torch.cat(outs)


# --------------------------------------------------------------------------------- the attention function
@dataclass
class _Config:
    backend: str = "auto"
    validate: bool = True
    group: Any = None
    token_ranges: list[tuple[int, int]] | None = None


class _MetaCache:
    """The forest of the last tree seen, keyed on the identity and version of its three tensors: every
    layer of one forward passes the same tensors, so the metadata is built and checked once."""

    def __init__(self) -> None:
        self.refs: tuple = ()
        self.key: tuple = ()
        self.meta: ForestMetadata | None = None

    def get(self, kv: Tensor, cu_q: Tensor, cu_k: Tensor, num_tokens: int, device: torch.device,
            max_q: Any, max_k: Any) -> ForestMetadata:
        ts = (kv, cu_q, cu_k)
        if not all(isinstance(t, Tensor) for t in ts):
            return tree_metadata(kv, cu_q, cu_k, num_tokens, tree_max_seqlen_q=max_q, tree_max_seqlen_k=max_k,
                                 device=device)
        key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.device) for t in ts) + (num_tokens, device)
        if (self.meta is not None and key == self.key and len(self.refs) == 3
                and all(r() is t for r, t in zip(self.refs, ts))):
            return self.meta
        meta = tree_metadata(kv, cu_q, cu_k, num_tokens, tree_max_seqlen_q=max_q, tree_max_seqlen_k=max_k,
                             device=device)
        self.refs, self.key, self.meta = tuple(weakref.ref(t) for t in ts), key, meta
        return meta


_CACHE = _MetaCache()


def tree_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, *, _config: _Config | None = None,
                           **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention function for TRL's packed tree (the keywords of
    ``trl.experimental.async_grpo.packing.tree_attention``). query [1, Hq, T, D], key/value [1, Hk, T, D]
    with RoPE applied; returns (out [1, T, Hq, D], None). ``sliding_window`` / ``softcap`` / ``s_aux``
    become ``window`` / ``softcap`` / ``sinks``; any other keyword with a value raises."""
    cfg = _config or _Config()
    forest = kwargs.pop("multiverse_forest", None)  # MultiverseGRPOTrainer's packed forest, in place of TRL's
    missing = [k for k in TREE_KEYWORDS[:3] if kwargs.get(k) is None]
    if missing and forest is None:
        raise ValueError(f"{missing[0]}: the tree attention needs TRL's packed-tree keywords "
                         f"({', '.join(TREE_KEYWORDS)}) in the model's forward (TreeRow.pack() makes them)")
    tree = {k: kwargs.pop(k, None) for k in TREE_KEYWORDS}
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"query: expected one packed row (batch size 1, [1, Hq, T, D]), got shape "
                         f"{tuple(query.shape)}; pass each DP rank's TreeRow as its own batch of one")
    if attention_mask is not None:
        raise ValueError("attention_mask: the tree attention takes its mask from tree_kv_index / "
                         "tree_cu_seqlens_*; its registered mask function returns None, pass none")
    if dropout and module.training:
        raise NotImplementedError("dropout: attention dropout is not supported by the tree attention")
    variant = attention_variant(kwargs, query)
    T = query.shape[2]
    group = cfg.group
    world = 1
    if group is not None:
        world = dist.get_world_size(group) if dist.is_initialized() else 1
    num_tokens = None if world > 1 else T
    if forest is not None:
        meta = forest
    else:
        meta = _CACHE.get(tree["tree_kv_index"], tree["tree_cu_seqlens_q"], tree["tree_cu_seqlens_k"],
                          num_tokens, query.device, tree["tree_max_seqlen_q"], tree["tree_max_seqlen_k"])
    # under autocast the attention runs in the autocast dtype (as SDPA and TRL's FA3 call do)
    dev = query.device.type
    dtype = (torch.get_autocast_dtype(dev) if query.dtype == torch.float32 and torch.is_autocast_enabled(dev)
             else query.dtype)
    q = query[0].transpose(0, 1).to(dtype)  # [T, Hq, D]
    k = key[0].transpose(0, 1).to(dtype).contiguous()  # [T, Hk, D]
    v = value[0].transpose(0, 1).to(dtype).contiguous()
    sm = q.shape[-1] ** -0.5 if scaling is None else scaling
    if world > 1:
        ranges = cfg.token_ranges or even_token_ranges(meta.total_q, world)
        s, e = ranges[dist.get_rank(group)]
        if e - s != T:
            raise ValueError(f"query: this rank holds {T} tokens, its token range {(s, e)} of the packed row "
                             f"has {e - s}; feed the model input_ids[{s}:{e}] and the whole row's tree "
                             "keywords")
        # window / softcap / sinks as in the single process (window: the whole row's positions, node_pos)
        out = cp_tree_attention(q.contiguous(), k, v, meta, group=group, token_ranges=ranges, sm_scale=sm,
                                backend=cfg.backend, validate=cfg.validate, **variant)
        return out.unsqueeze(0), None
    kc = k.view(T, 1, k.shape[1], k.shape[2])  # the packed K/V as a page-size-1 cache: no copy, no gather
    vc = v.view(T, 1, v.shape[1], v.shape[2])
    out = tree_attention(q.contiguous(), kc, vc, meta, sm_scale=sm, backend=cfg.backend,
                         validate=forest is not None and cfg.validate,
                         **variant)
    return out.unsqueeze(0), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


_TRL_ORIGINAL: dict[str, Any] = {}


def register(name: str = TRL_TREE_ATTENTION, *, backend: str = "auto", validate: bool = True,
             group: Any = None, token_ranges: Sequence[tuple[int, int]] | None = None) -> str:
    """Register :func:`tree_attention_forward` (and a mask function that builds no mask) with
    transformers under ``name``; returns ``name``.

    Under TRL's own name (the default, ``"tree_fa3"``) ``AsyncGRPOTrainer`` uses it unchanged: its
    ``__init__`` calls ``register_tree_attention()``, which is redirected here to keep this function
    (:func:`unregister` puts TRL's back). ``backend``: the :func:`multiverse_kernels.tree_attention`
    backend ("auto": the fastest for the device). ``group``: a ``torch.distributed`` group; with more
    than one rank the attention runs context-parallel (see the module docstring), each rank holding
    ``token_ranges[rank]`` of the packed row (default: an even split)."""
    cfg = _Config(backend=backend, validate=validate, group=group,
                  token_ranges=None if token_ranges is None else [tuple(r) for r in token_ranges])
    fn = functools.partial(tree_attention_forward, _config=cfg)
    functools.update_wrapper(fn, tree_attention_forward)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _no_mask)
    if name == TRL_TREE_ATTENTION:
        def reregister() -> None:
            AttentionInterface.register(name, fn)
            AttentionMaskInterface.register(name, _no_mask)

        _redirect_trl(reregister)
    return name


def _redirect_trl(reregister: Any) -> None:
    import sys

    from trl.experimental.async_grpo import packing

    _TRL_ORIGINAL.setdefault("register_tree_attention", packing.register_tree_attention)
    packing.register_tree_attention = reregister
    trainer_mod = sys.modules.get("trl.experimental.async_grpo.async_grpo_trainer")
    if trainer_mod is not None:  # it imported the name from packing
        trainer_mod.register_tree_attention = reregister


def unregister(name: str = TRL_TREE_ATTENTION) -> None:
    """Put TRL's own FA3 tree attention back under ``name`` (and its ``register_tree_attention``)."""
    import sys

    from trl.experimental.async_grpo import packing

    orig = _TRL_ORIGINAL.pop("register_tree_attention", None)
    if orig is not None:
        packing.register_tree_attention = orig
        trainer_mod = sys.modules.get("trl.experimental.async_grpo.async_grpo_trainer")
        if trainer_mod is not None:
            trainer_mod.register_tree_attention = orig
    if name == TRL_TREE_ATTENTION:
        packing.register_tree_attention()


# ------------------------------------------------------------------------------------------ GRPOTrainer
GRPO_ATTENTION = "multiverse_trl_grpo"  # the name MultiverseGRPOTrainer switches its models to, per forward


@contextlib.contextmanager
def _switched(model: Any, name: str) -> Iterator[None]:
    prev = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if prev == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(prev)


def _concat(parts: list[PackedRollouts]) -> PackedRollouts:
    """Several packed trees as one forest (several roots): indices offset, order kept."""
    tok_off = node_off = 0
    fields: dict[str, list] = {k: [] for k in ("token_ids", "position_ids", "trainable", "prev_index",
                                               "node_start", "node_len", "node_parent", "vis_nodes")}
    vis_indptr = [torch.zeros(1, dtype=torch.int64)]
    leaves, sequences = [], []
    for p in parts:
        fields["token_ids"].append(p.token_ids)
        fields["position_ids"].append(p.position_ids)
        fields["trainable"].append(p.trainable)
        fields["prev_index"].append(torch.where(p.prev_index >= 0, p.prev_index + tok_off, p.prev_index))
        fields["node_start"].append(p.node_start + tok_off)
        fields["node_len"].append(p.node_len)
        fields["node_parent"].append(torch.where(p.node_parent >= 0, p.node_parent + node_off, p.node_parent))
        fields["vis_nodes"].append(p.vis_nodes + node_off)
        vis_indptr.append(p.vis_indptr[1:] + vis_indptr[-1][-1])
        leaves += [leaf + node_off for leaf in p.leaves]
        sequences += [s + tok_off for s in p.sequences]
        tok_off += p.num_tokens
        node_off += p.num_nodes
    return PackedRollouts(**{k: torch.cat(v) for k, v in fields.items()}, vis_indptr=torch.cat(vis_indptr),
                          leaves=leaves, sequences=sequences)


def pack_prompt_groups(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
                       ) -> tuple[PackedRollouts, Tensor, list[int]]:
    """Pack rows ``prompt_b + completion_b`` so that rows with the same prompt share it: per distinct
    prompt one tree whose root is the prompt but its last token and whose children are ``[last prompt
    token] + completion_b`` (forking one token early, as TRL's trie does, gives every packed position a
    single next-token label). Returns the forest, ``labels [L]`` (the completion token each position
    predicts, -100 elsewhere) and, per row, the packed index of the position predicting its first
    completion token (completion token j is predicted at that index + j)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, p in enumerate(prompts):
        p = tuple(int(t) for t in p)
        if not p:
            raise ValueError(f"prompts[{b}]: empty; every row needs at least one prompt token")
        groups.setdefault(p, []).append(b)
    trees, owner = [], []  # owner: per tree, the rows of its leaves in order
    for p, rows in groups.items():
        kids = [list(p[-1:]) + [int(t) for t in completions[b]] for b in rows]
        if len(p) > 1:
            trees.append(pack_rollouts(RolloutNode(list(p[:-1]), [RolloutNode(k) for k in kids], False)))
            owner.append(rows)
        else:
            for b, k in zip(rows, kids):
                trees.append(pack_rollouts(RolloutNode(k)))
                owner.append([b])
    packed = _concat(trees)
    labels = torch.full((packed.num_tokens,), -100, dtype=torch.int64)
    first = [0] * len(prompts)
    leaf_rows = [b for rows in owner for b in rows]
    for leaf, b in zip(packed.leaves, leaf_rows, strict=True):
        s = int(packed.node_start[leaf])
        c = torch.as_tensor([int(t) for t in completions[b]], dtype=torch.int64)
        labels[s:s + c.numel()] = c
        first[b] = s
    return packed, labels, first


class MultiverseGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs (policy with its backward, old, reference) come
    from one forward over a packed forest per micro-batch: each distinct prompt once, its
    completions as children (``multiverse_kernels.rl``), attention by
    :func:`multiverse_kernels.tree_attention` (``mk_backend``, default "auto"), no padding. The
    loss, the advantages and everything else are the stock trainer's. Falls back to the stock
    forward (unchanged results) for multimodal inputs, MoE aux losses and completion masks that
    are not a prefix of ones."""

    mk_backend: str = "auto"
    mk_validate: bool = True

    def __init__(self, *args: Any, mk_backend: str = "auto", mk_validate: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mk_backend, self.mk_validate = mk_backend, mk_validate
        self._mk_stack: contextlib.ExitStack | None = None
        self.mk_stats = {"packed_tokens": 0, "unpacked_tokens": 0}

    def training_step(self, *args: Any, **kwargs: Any):
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._mk_release()

    def _mk_release(self) -> None:
        if getattr(self, "_mk_stack", None) is not None:
            stack, self._mk_stack = self._mk_stack, None
            stack.close()

    @contextlib.contextmanager
    def _mk_switched(self, model: Any) -> Iterator[None]:
        base = self.accelerator.unwrap_model(model)
        if hasattr(base, "get_base_model"):  # PEFT
            base = base.get_base_model()
        ckpt = any(getattr(base, n, False) for n in ("is_activation_checkpointing",
                                                    "is_gradient_checkpointing"))
        name = register(GRPO_ATTENTION, backend=self.mk_backend, validate=self.mk_validate)
        if ckpt and torch.is_grad_enabled() and base.training:
            # checkpointing re-runs the attention in backward: stay switched until training_step ends
            if self._mk_stack is None:
                self._mk_stack = contextlib.ExitStack()
                self._mk_stack.enter_context(_switched(base, name))
            yield
        else:
            with _switched(base, name):
                yield

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False,
                                           compute_aux_loss=False, **extra):
        if compute_aux_loss or any(v is not None for v in extra.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        B, W = input_ids.shape
        P = W - logits_to_keep
        cmask = attention_mask[:, P:].bool()
        n = cmask.sum(1)
        prefix = torch.arange(logits_to_keep, device=cmask.device)[None] < n[:, None]
        pmask = attention_mask[:, :P].bool()
        if not torch.equal(prefix, cmask) or bool((pmask.sum(1) == 0).any()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        ids = input_ids.detach().cpu()
        pm, nn = pmask.cpu(), n.cpu().tolist()
        prompts = [ids[b, :P][pm[b]].tolist() for b in range(B)]
        comps = [ids[b, P:P + nn[b]].tolist() for b in range(B)]
        # chunks of whole prompt groups with at most batch_size rows (at least one group)
        order: dict[tuple, list[int]] = {}
        for b, p in enumerate(prompts):
            order.setdefault(tuple(p), []).append(b)
        chunks, cur = [], []
        limit = batch_size or B
        for rows in order.values():
            if cur and len(cur) + len(rows) > limit:
                chunks.append(cur)
                cur = []
            cur = cur + rows
        chunks.append(cur)
        dev = input_ids.device
        logps = torch.zeros(B, logits_to_keep, device=dev)
        ents = torch.zeros(B, logits_to_keep, device=dev) if compute_entropy else None
        lp_parts, ent_parts = [], []
        for rows in chunks:
            packed, labels, first = pack_prompt_groups([prompts[b] for b in rows],
                                                       [comps[b] for b in rows])
            self.mk_stats["packed_tokens"] += packed.num_tokens
            self.mk_stats["unpacked_tokens"] += sum(len(prompts[b]) + len(comps[b]) for b in rows)
            meta = packed.metadata(dev)
            with self._mk_switched(model), self.accelerator.autocast():
                out = model(input_ids=packed.token_ids.to(dev)[None],
                            position_ids=packed.position_ids.to(dev)[None],
                            shift_labels=labels.to(dev)[None], fused_lm_head=True, multiverse_forest=meta)
            idx = torch.full((len(rows), logits_to_keep), -1, dtype=torch.int64)
            for i, b in enumerate(rows):
                idx[i, :nn[b]] = first[i] + torch.arange(nn[b])
            lp_parts.append((rows, idx, out.log_probs[0]))
            if compute_entropy:
                ent_parts.append(out.entropy[0])
        # scatter back to [B, logits_to_keep] (0 where the completion is padded, as the stock trainer)
        for j, (rows, idx, lp) in enumerate(lp_parts):
            idx = idx.to(dev)
            valid = idx >= 0
            r = torch.as_tensor(rows, device=dev)
            logps = logps.index_put((r,), torch.where(valid, lp[idx.clamp(min=0)], 0.0).to(logps.dtype))
            if compute_entropy:
                e = ent_parts[j]
                ents = ents.index_put((r,), torch.where(valid, e[idx.clamp(min=0)], 0.0).to(ents.dtype))
        return logps, ents, None
