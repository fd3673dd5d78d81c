"""Packed RL rollout trees: a prompt and its sampled completions (GRPO groups), and multi-turn rollouts
that branch again, packed into ONE sequence plus a KV forest (docs/training.md, "RL rollout trees").

The prompt is stored (and run through the model) once; each completion is a child node that sees the
prompt and itself (causal) but not its siblings; a completion may have children of its own (a tool
reply, then several sampled next turns, ...). Positions continue per branch: a node's first token is at
``position(parent's last token) + 1``, so every root-to-leaf path carries exactly the positions it would
have alone. Every node is its own query group with ``q_len = node_len`` and K/V contiguous (a
page-size-1 cache), like the packed Multiverse sequences of :mod:`multiverse_kernels.multiverse`, so
:func:`~multiverse_kernels.integrations.transformers.packed_forward` runs it without a dense mask.

    tree = group_tree(prompt_ids, [completion_ids_0, ..., completion_ids_N-1])
    packed = pack_rollouts(tree)
    logits = packed_forward(model, packed)          # [L, vocab], L = prompt + sum of completions
    lp = packed.token_logprobs(logits)              # [L]: log p(token | its own branch's context)
    per_completion = packed.per_sequence(lp, trainable_only=True)   # list of [len_i]

The log-probs of completion ``i`` equal those of running ``prompt + completion_i`` alone, and a loss
summed over completions has the gradient of the sum of the unpacked runs' losses
(tests/integrations/test_rl.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .metadata import ForestMetadata, node_start_positions

__all__ = ["RolloutNode", "PackedRollouts", "group_tree", "pack_rollouts", "pack_group", "rollout_forward"]


@dataclass
class RolloutNode:
    """One run of tokens of a rollout tree: ``tokens`` (int, non-empty), whether they are trained on
    (``trainable``: policy-sampled tokens; False for a prompt or a tool/environment reply), and the
    continuations that branch from its last token (``children``)."""

    tokens: Sequence[int] | Tensor
    children: list[RolloutNode] = field(default_factory=list)
    trainable: bool = True


def group_tree(prompt: Sequence[int] | Tensor, completions: Sequence[Sequence[int] | Tensor]
               ) -> RolloutNode:
    """A GRPO group: the prompt (not trainable) with one trainable child per sampled completion."""
    return RolloutNode(prompt, [RolloutNode(c) for c in completions], trainable=False)


@dataclass
class PackedRollouts:
    """A rollout tree packed into one sequence (nodes in depth-first pre-order, parents first).

    Tensors (int64 unless noted, on one device)::

        token_ids     [L]        the packed tokens
        position_ids  [L]        position of each token on its own branch (0 = the root's first token)
        trainable     [L] bool   token is trained on (its node's ``trainable``)
        prev_index    [L]        packed index of the token whose logits predict this one (the previous
                                 token of the branch: within the node, or the parent's last); -1 for
                                 the root's first token
        node_start    [N]        first packed index of each node;  node_len [N];  node_parent [N] (-1)
        vis_indptr    [N + 1], vis_nodes [V]: each node's ancestors, root first, itself last

    ``leaves``: node ids of the leaves (one trajectory each) in pre-order; for :func:`group_tree` these
    are the completions in order. ``sequences[i]``: packed indices of trajectory ``i`` (root to leaf),
    so ``token_ids[sequences[i]]`` is what running it alone would feed the model.
    """

    token_ids: Tensor
    position_ids: Tensor
    trainable: Tensor
    prev_index: Tensor
    node_start: Tensor
    node_len: Tensor
    node_parent: Tensor
    vis_indptr: Tensor
    vis_nodes: Tensor
    leaves: list[int]
    sequences: list[Tensor]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def num_nodes(self) -> int:
        return int(self.node_len.numel())

    def unpacked_tokens(self) -> int:
        """Tokens the trajectories hold when each is run alone (sum of their lengths)."""
        return sum(int(s.numel()) for s in self.sequences)

    def to(self, device: torch.device | str) -> PackedRollouts:
        kw = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        kw["sequences"] = [s.to(device) for s in self.sequences]
        return PackedRollouts(**kw)

    def metadata(self, device: torch.device | str | None = None) -> ForestMetadata:
        """Packed-training metadata: K/V contiguous ``[L, Hk, D]`` viewed as a page-size-1 cache
        ``[L, 1, Hk, D]`` (page id = packed index); every node is its own group with ``q_len =
        node_len`` (query row i is packed token i), seeing its ancestors and itself (causal)."""
        device = self.token_ids.device if device is None else torch.device(device)
        i32 = dict(dtype=torch.int32, device=device)
        indptr = torch.zeros(self.num_nodes + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(self.node_len.cpu(), 0)
        indptr = indptr.to(**i32)
        return ForestMetadata(
            node_page_indptr=indptr, node_page_indices=torch.arange(self.num_tokens, **i32),
            node_len=self.node_len.to(**i32), qo_indptr=indptr.clone(),
            vis_indptr=self.vis_indptr.to(**i32), vis_nodes=self.vis_nodes.to(**i32), page_size=1,
            node_pos=node_start_positions(self.position_ids, indptr, self.node_len).to(**i32))

    def token_logprobs(self, logits: Tensor) -> Tensor:
        """log p(token_t | its branch's context) from packed ``logits [L, vocab]`` -> [L] float32 (or
        float64 for float64 logits); 0 for the root's first token (no context)."""
        if logits.shape[0] != self.num_tokens:
            raise ValueError(f"logits: expected {self.num_tokens} rows (one per packed token), got "
                             f"{logits.shape[0]}")
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        prev = self.prev_index.to(logits.device)
        src = prev.clamp(min=0)
        lp = torch.log_softmax(logits.to(acc), -1)[src].gather(
            1, self.token_ids.to(logits.device)[:, None])[:, 0]
        return torch.where(prev >= 0, lp, torch.zeros_like(lp))

    def per_sequence(self, values: Tensor, *, trainable_only: bool = False) -> list[Tensor]:
        """Map per-token ``values [L, ...]`` back to each trajectory: ``values[sequences[i]]`` (only its
        trainable tokens with ``trainable_only``; for a GRPO group: completion ``i``'s tokens)."""
        if values.shape[0] != self.num_tokens:
            raise ValueError(f"values: expected {self.num_tokens} rows (one per packed token), got "
                             f"{values.shape[0]}")
        out = []
        for s in self.sequences:
            s = s.to(values.device)
            if trainable_only:
                s = s[self.trainable.to(values.device)[s]]
            out.append(values[s])
        return out


def pack_rollouts(tree: RolloutNode, device: torch.device | str | None = None) -> PackedRollouts:
    """Pack a rollout tree (see :class:`PackedRollouts`). Every node must hold at least one token."""
    nodes: list[tuple[RolloutNode, int, str]] = []  # (node, parent id, name for errors)
    stack = [(tree, -1, "tree")]
    while stack:  # depth-first pre-order, children in their given order
        n, parent, name = stack.pop()
        nodes.append((n, parent, name))
        me = len(nodes) - 1
        stack.extend((c, me, f"{name}.children[{i}]") for i, c in reversed(list(enumerate(n.children))))
    toks, lens, parents = [], [], []
    for n, parent, name in nodes:
        t = torch.as_tensor(n.tokens, dtype=torch.int64).flatten().cpu()
        if t.numel() == 0:
            raise ValueError(f"{name}.tokens: expected at least one token (an empty node has no token "
                             f"whose logits its children could continue from)")
        toks.append(t)
        lens.append(t.numel())
        parents.append(parent)
    node_len = torch.tensor(lens, dtype=torch.int64)
    node_start = torch.cumsum(node_len, 0) - node_len
    starts, pos0 = node_start.tolist(), [0] * len(nodes)
    prev_first, vis_indptr, vis_nodes, chains = [], [0], [], []
    for i, p in enumerate(parents):
        if p >= 0:
            pos0[i] = pos0[p] + lens[p]
            chains.append(chains[p] + [i])
            prev_first.append(starts[p] + lens[p] - 1)
        else:
            chains.append([i])
            prev_first.append(-1)
        vis_nodes += chains[i]
        vis_indptr.append(len(vis_nodes))
    node_of = torch.repeat_interleave(torch.arange(len(nodes)), node_len)
    j = torch.arange(int(node_len.sum())) - node_start[node_of]
    position_ids = torch.tensor(pos0, dtype=torch.int64)[node_of] + j
    prev_index = torch.arange(j.numel()) - 1
    prev_index[node_start] = torch.tensor(prev_first, dtype=torch.int64)
    trainable = torch.tensor([n.trainable for n, _, _ in nodes], dtype=torch.bool)[node_of]
    has_child = set(parents)
    leaves = [i for i in range(len(nodes)) if i not in has_child]
    sequences = [torch.cat([torch.arange(starts[c], starts[c] + lens[c]) for c in chains[leaf]])
                 for leaf in leaves]
    packed = PackedRollouts(
        token_ids=torch.cat(toks), position_ids=position_ids, trainable=trainable, prev_index=prev_index,
        node_start=node_start, node_len=node_len, node_parent=torch.tensor(parents, dtype=torch.int64),
        vis_indptr=torch.tensor(vis_indptr, dtype=torch.int64),
        vis_nodes=torch.tensor(vis_nodes, dtype=torch.int64), leaves=leaves, sequences=sequences)
    return packed if device is None else packed.to(device)


def pack_group(prompt: Sequence[int] | Tensor, completions: Sequence[Sequence[int] | Tensor],
               device: torch.device | str | None = None) -> PackedRollouts:
    """``pack_rollouts(group_tree(prompt, completions))``: sequence ``i`` is prompt + completion ``i``."""
    return pack_rollouts(group_tree(prompt, completions), device)


def rollout_forward(model: Any, packed: PackedRollouts, *, backend: str = "auto",
                    validate: bool = True) -> Tensor:
    """Logits ``[L, vocab]`` of the packed rollouts through a transformers causal LM (switched to the
    "multiverse" attention; see :func:`~multiverse_kernels.integrations.transformers.packed_forward`).
    Differentiable through ``tree_attention``'s backward."""
    from .integrations.transformers import packed_forward

    return packed_forward(model, packed, backend=backend, validate=validate)
