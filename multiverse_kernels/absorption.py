"""Tiny-node absorption (FastTree's idea): fold small nodes into the nodes that follow them.

A node read by many rows but holding few tokens (the one-token nodes of speculative token trees, a
short shared step of a beam) costs every row that reads it one partial state of its own: written by
the attention kernel, read back by the merge. For a one-token node that traffic is ~8x the node's
K+V. :func:`absorb_tiny_nodes` rewrites the metadata so that such a node ``n`` is read as the head of
each following node ``s`` instead: a *virtual node* ``n ++ s`` whose page list is ``n``'s pages
followed by ``s``'s. ``n``'s tokens are then loaded once per successor (more K/V bytes) and its
readers need no partial state of their own (fewer partial bytes); it is done only when that moves
fewer bytes (the rule below). The attention every row computes is unchanged: a row sees the same set
of tokens, grouped into fewer nodes (docs/plan.md, "Tiny nodes").

Definitions (on the lists of groups with ``q_len > 0``; entries of a list in order):

* ``pred(s)``: the set of nodes listed right before ``s`` in every list that holds ``s`` (a special
  START when ``s`` is listed first). An edge ``n -> s`` is a *candidate* when ``s`` is not empty,
  ``pred(s) = {n}`` (every row that reads ``s`` reads ``n`` just before it, as in a tree whose lists
  run root to leaf) and ``n`` fills whole pages (``node_len[n] > 0`` and ``node_len[n] % page_size ==
  0``: page lists then concatenate; always true at page size 1).
* ``chain(n)``: ``n`` preceded by the chain of its predecessor when that edge was absorbed; its length
  ``chain_len(n)`` in tokens. A virtual node ``chain(s)`` replaces ``s`` where ``s`` ends a segment.
* for a node ``n`` with ``k >= 1`` candidate successors, which ``rows`` rows read in all, and ``alone`` = 1
  when ``n`` still ends a segment somewhere (it is the last node of a list, or one of its successors
  is not a candidate), else 0: absorbing ``n`` loads ``(k + alone - 1) * chain_len(n)`` more tokens per
  KV head and saves those ``rows`` rows one partial state each. ``n`` is absorbed into its candidate
  successors when

      (k + alone - 1) * chain_len(n) * 2 * head_dim * kv_elem_size
          < rows * group * (head_dim + 1) * 4 * 2

  (K+V bytes on the left; on the right a partial's fp32 ``out`` and ``lse`` per GQA head, written
  once and read once), and ``chain_len(n) <= MAX_ABSORBED_TOKENS`` (8). Nodes are decided predecessor
  first, so ``chain_len`` is known.

The rewritten metadata keeps every original node (same ids; nodes read only inside a segment are
simply no longer listed), appends one virtual node per segment end ``s`` with a non-trivial chain (in
increasing ``s``), and replaces each list's segments by their end's node. Groups with ``q_len = 0``
keep their lists. Virtual nodes share pages with the nodes they are built from: the result is for
reading (the forward); training does not need it (packed training forests have no tiny nodes).

Two implementations give identical results (tested): the C++ one (csrc/absorb.cpp through
``torch.ops.multiverse_C.absorb_tiny_nodes``; the default when the extension is built, part of the
planning hot path) and this module's torch one (the spec).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._native import host_op
from .metadata import ForestMetadata, MetadataError

__all__ = ["absorb_tiny_nodes", "MAX_ABSORBED_TOKENS"]

# Longest chain (tokens) absorbed into a successor: tiny nodes only (the one-token nodes of token
# trees, short chains of them). Absorbing trades K/V loads for partial-state traffic; capped this low,
# the extra loads stay a few tokens per successor, so forests without token trees keep K+V loads at
# the unique bytes (tests/backends/test_triton_kv_traffic.py), and a virtual node's head stays far below the
# planner's smallest chunk (256 tokens): the rule does not model chunks, and the one case it misses (a
# successor ending less than 8 tokens below a chunk boundary gets one more chunk, whose partial gives
# back the one saved) is rare and bounded.
MAX_ABSORBED_TOKENS = 8


def _cpp_absorber():
    """torch.ops.multiverse_C.absorb_tiny_nodes when the C++ extension is built, else None."""
    return host_op("absorb_tiny_nodes")


def absorb_tiny_nodes(meta: ForestMetadata, num_qo_heads: int, num_kv_heads: int, *, head_dim: int = 128,
                      kv_elem_size: int = 2, impl: str | None = None) -> ForestMetadata:
    """Fold tiny nodes into their successors where that moves fewer bytes (module docstring).

    Args:
        meta: valid forest metadata (any device; the result lands on it).
        num_qo_heads, num_kv_heads: head counts (the partial states' size per KV head).
        head_dim: D of q and the caches.
        kv_elem_size: bytes per K/V element (2 for fp16/bf16, 4 for fp32).
        impl: ``"cpp"``, ``"torch"`` or None (C++ when the extension is built); identical results.
    Returns:
        ``meta`` itself when nothing is absorbed; else a new :class:`ForestMetadata` (int32 tensors on
        ``meta.device``) in which every row sees exactly the tokens it saw in ``meta``, with
        ``num_nodes`` = the original nodes + the virtual ones. Use it for the plan and the forward call
        of the same step (``tree_attention(q, k, v, absorbed, plan=plan_tree_attention(absorbed, ...))``);
        the default path of the forward does this itself.
    """
    if num_kv_heads < 1 or num_qo_heads % num_kv_heads:
        raise MetadataError(f"num_kv_heads: expected a divisor of num_qo_heads={num_qo_heads}, "
                            f"got {num_kv_heads}")
    if not isinstance(head_dim, int) or head_dim < 1:
        raise MetadataError(f"head_dim: expected a positive int, got {head_dim!r}")
    if kv_elem_size not in (1, 2, 4, 8):
        raise MetadataError(f"kv_elem_size: expected 1, 2, 4 or 8 bytes, got {kv_elem_size!r}")
    if impl not in (None, "cpp", "torch"):
        raise MetadataError(f"impl: expected 'cpp', 'torch' or None, got {impl!r}")
    if meta.page_size > MAX_ABSORBED_TOKENS:
        # a candidate fills whole pages, so its chain is >= page_size tokens: longer than any absorbed
        # chain. Nothing to do (and nothing to pay: the planning hot path of every page size >= 16).
        return meta
    group = num_qo_heads // num_kv_heads
    cpp = _cpp_absorber() if impl != "torch" else None
    if impl == "cpp" and cpp is None:
        raise MetadataError("impl: 'cpp' needs the C++ extension multiverse_kernels._C (docs/build.md)")
    if cpp is not None:
        out = cpp(meta.node_page_indptr, meta.node_page_indices, meta.node_len, meta.qo_indptr,
                  meta.vis_indptr, meta.vis_nodes, meta.page_size, group, head_dim, kv_elem_size,
                  MAX_ABSORBED_TOKENS)
        if out[0].numel() == 0:  # nothing absorbed
            return meta
        indptr, indices, node_len, vis_indptr, vis_nodes = out
    else:
        res = _absorb_torch(meta, group, head_dim, kv_elem_size)
        if res is None:
            return meta
        indptr, indices, node_len, vis_indptr, vis_nodes = res
    dev = meta.device
    return ForestMetadata(indptr.to(dev), indices.to(dev), node_len.to(dev), meta.qo_indptr,
                          vis_indptr.to(dev), vis_nodes.to(dev), meta.page_size, meta.own_full)


def _absorb_torch(meta: ForestMetadata, group: int, head_dim: int,
                  elem: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """The rewritten (node_page_indptr, node_page_indices, node_len, vis_indptr, vis_nodes) on the host,
    or None when nothing is absorbed."""
    cpu = torch.device("cpu")
    L = meta.node_len.to(cpu).long()
    N = L.numel()
    vi = meta.vis_indptr.to(cpu).long()
    vn = meta.vis_nodes.to(cpu).long()
    q_len = (meta.qo_indptr[1:] - meta.qo_indptr[:-1]).to(cpu).long()
    G, E, ps = q_len.numel(), vn.numel(), meta.page_size
    if N == 0 or E == 0:
        return None
    cnt = vi[1:] - vi[:-1]
    eg = torch.repeat_interleave(torch.arange(G), cnt, output_size=E)
    e = torch.arange(E)
    live = q_len[eg] > 0
    first = e == vi[:-1][eg]
    last = e == vi[1:][eg] - 1
    pred_e = torch.where(first, -1, vn[(e - 1).clamp(min=0)])

    # pred(s): unique when its min and max over the live entries agree (and is not START).
    big = N + 1
    pmin = torch.full((N,), big, dtype=torch.long).scatter_reduce_(0, vn[live], pred_e[live], "amin")
    pmax = torch.full((N,), -2, dtype=torch.long).scatter_reduce_(0, vn[live], pred_e[live], "amax")
    rows = torch.zeros(N, dtype=torch.long).index_add_(0, vn[live], q_len[eg[live]])
    p = pmin.clamp(max=N - 1).clamp(min=0)
    cand = (rows > 0) & (L > 0) & (pmin == pmax) & (pmin >= 0) & (L[p] > 0) & (L[p] % ps == 0)

    # Per node n: k candidate successors, the rows that read them, and whether n still ends a segment.
    k = torch.zeros(N, dtype=torch.long).index_add_(0, p[cand], torch.ones_like(p[cand]))
    rows_via = torch.zeros(N, dtype=torch.long).index_add_(0, p[cand], rows[cand])
    succ_e = vn[(e + 1).clamp(max=E - 1)]
    ends = live & (last | ~cand[succ_e])
    alone = torch.zeros(N, dtype=torch.bool)
    alone[vn[ends]] = True

    tok_bytes = 2 * head_dim * elem
    part_bytes = group * (head_dim + 1) * 4 * 2

    def decide(nodes: Tensor, chain_len: Tensor) -> Tensor:
        extra = (k[nodes] + alone[nodes].long() - 1) * chain_len * tok_bytes
        return (k[nodes] >= 1) & (chain_len <= MAX_ABSORBED_TOKENS) & (extra < rows_via[nodes] * part_bytes)

    # Predecessor first: nodes without a candidate in-edge start chains; then level by level.
    chain = L.clone()
    absorbed = torch.zeros(N, dtype=torch.bool)
    decided = ~cand
    idx = decided.nonzero().flatten()
    absorbed[idx] = decide(idx, chain[idx])
    while True:
        front = (cand & ~decided & decided[p]).nonzero().flatten()
        if front.numel() == 0:
            break
        pf = p[front]
        chain[front] = L[front] + torch.where(absorbed[pf], chain[pf], 0)
        absorbed[front] = decide(front, chain[front])
        decided[front] = True
    absorbed &= decided  # nodes on predecessor cycles are never decided: not absorbed
    edge = cand & decided & absorbed[p]  # s has its predecessor's chain in front of it
    if not bool(edge.any()):
        return None

    # Rewrite the live lists: drop entries absorbed into the next one, map segment ends to virtual ids.
    inside = live & ~last & edge[succ_e]
    keep = ~inside
    end_nodes = torch.zeros(N, dtype=torch.bool)
    end_nodes[vn[live & keep]] = True
    virt = (edge & end_nodes).nonzero().flatten()  # increasing s
    vid = torch.arange(N)
    vid[virt] = N + torch.arange(virt.numel())
    new_vn = torch.where(live, vid[vn], vn)[keep]
    new_cnt = torch.zeros(G, dtype=torch.long).index_add_(0, eg[keep], torch.ones_like(eg[keep]))
    new_vi = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(new_cnt, 0)])

    # Virtual nodes' members, root of the chain first: walk back over absorbed edges.
    members = [virt]
    cur = virt
    while True:
        has = (cur >= 0) & edge[cur.clamp(min=0)]
        if not bool(has.any()):
            break
        cur = torch.where(has, p[cur.clamp(min=0)], -1)
        members.append(cur)
    mem = torch.stack(members[::-1], 1)  # [V, depth], -1 padding at the front
    V = virt.numel()
    valid = mem >= 0
    m = mem.clamp(min=0)
    pi = meta.node_page_indptr.to(cpu).long()
    is_last = torch.zeros_like(valid)
    is_last[:, -1] = True
    npg = torch.where(is_last, pi[m + 1] - pi[m], L[m] // ps) * valid
    flat_m, flat_n = m.flatten(), npg.flatten()
    tot = int(flat_n.sum())
    src_start = torch.repeat_interleave(pi[flat_m], flat_n, output_size=tot)
    seg_first = torch.cumsum(flat_n, 0) - flat_n
    j = torch.arange(tot) - torch.repeat_interleave(seg_first, flat_n, output_size=tot)
    v_pages = meta.node_page_indices.to(cpu).long()[src_start + j]
    v_cnt = npg.sum(1)
    new_len = torch.cat([L, (L[m] * valid).sum(1)])
    new_pi = torch.cat([pi, pi[-1] + torch.cumsum(v_cnt, 0)])
    new_pages = torch.cat([meta.node_page_indices.to(cpu).long(), v_pages])
    assert V == new_len.numel() - N
    i32 = torch.int32
    return new_pi.to(i32), new_pages.to(i32), new_len.to(i32), new_vi.to(i32), new_vn.to(i32)
