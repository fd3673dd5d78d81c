"""The communication of context-parallel tree attention: one all-to-all of the needed K/V token slices
(forward), its reverse for their dK/dV (backward), the cross-rank agreement check, and a count of the
bytes this process sends (:func:`exchange_stats`)."""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from torch import Tensor

from ..metadata import MetadataError
from ..variants import FP8_DTYPES

__all__ = ["exchange_stats", "reset_exchange_stats", "comm_device", "agree", "start_fetch", "Attach"]

_STATS = {"forward_bytes_sent": 0, "backward_bytes_sent": 0, "exchanges": 0}
_LOCK = threading.Lock()


def exchange_stats() -> dict[str, int]:
    """Bytes this process has sent to other ranks (K/V slices in the forward, dK/dV in the backward) and
    the number of exchanges, since the last :func:`reset_exchange_stats`."""
    with _LOCK:
        return dict(_STATS)


def reset_exchange_stats() -> None:
    with _LOCK:
        for k in _STATS:
            _STATS[k] = 0


def _count(key: str, nbytes: int) -> None:
    with _LOCK:
        _STATS[key] += nbytes
        _STATS["exchanges"] += 1


def comm_device(group, like: torch.device) -> torch.device:
    """Where collectives of ``group`` take their tensors: CUDA for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(group, key: int, error: str | None, device: torch.device) -> None:
    """Every rank calls this once per op call before any data moves. Raise the same MetadataError on every
    rank if any rank found bad input (``error``) or the ranks' ``key`` (a hash of the metadata, ranges,
    shapes and dtype) differ; return quietly otherwise. Two small collectives only on failure."""
    world = dist.get_world_size(group)
    mine = torch.tensor([key, 0 if error is None else 1], dtype=torch.int64, device=device)
    got = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    got = [t.tolist() for t in got]
    if any(flag for _, flag in got):
        msgs: list[str | None] = [None] * world
        dist.all_gather_object(msgs, error, group=group)
        detail = "; ".join(f"rank {i}: {m}" for i, m in enumerate(msgs) if m is not None)
        raise MetadataError(f"distributed tree_attention: bad input on {sum(f for _, f in got)} of {world} "
                            f"ranks ({detail})")
    keys = [k for k, _ in got]
    if len(set(keys)) > 1:
        raise MetadataError(
            "meta: the metadata, token_ranges, head counts, head dim, dtype, sm_scale or attention variant "
            "(window, softcap, sinks, fp8 scales) differ between ranks "
            f"(every rank must pass the same forest; hashes by rank: {keys})")


def start_fetch(k: Tensor, v: Tensor, send_idx: Tensor, send_splits: list[int], recv_splits: list[int],
                group) -> tuple[Tensor, object]:
    """Start the all-to-all that brings this rank the K/V token slices it needs: returns the receive
    buffer ``[sum(recv_splits), 2, Hk, D]`` (K and V interleaved) and the work handle to wait on. An fp8
    cache moves as its bytes (a uint8 view: not every backend has fp8 collectives); the buffer is k's
    dtype."""
    kd, vd = k.detach(), v.detach()
    if k.dtype in FP8_DTYPES:
        kd, vd = kd.view(torch.uint8), vd.view(torch.uint8)
    send = torch.stack([kd[send_idx], vd[send_idx]], 1).contiguous()
    recv = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
    _count("forward_bytes_sent", send.numel() * send.element_size())
    work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group, async_op=True)
    return recv.view(k.dtype), work


class Attach(torch.autograd.Function):
    """Connect the received K/V slices to the autograd graph: forward returns them as ``(k_fetched,
    v_fetched)``; backward sends their gradients back to the ranks that own those tokens (the reverse
    all-to-all) and adds them into the owners' ``dk``, ``dv``."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, recv: Tensor, send_idx: Tensor, send_splits: list[int],
                recv_splits: list[int], group) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(send_idx)
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        ctx.kv = (k.shape, k.dtype, v.dtype)
        return recv[:, 0].contiguous(), recv[:, 1].contiguous()

    @staticmethod
    def backward(ctx, gk: Tensor, gv: Tensor):
        (send_idx,) = ctx.saved_tensors
        send_splits, recv_splits = ctx.splits
        shape, kdt, vdt = ctx.kv
        back = torch.stack([gk, gv], 1).contiguous()
        got = back.new_empty((sum(send_splits),) + tuple(back.shape[1:]))
        _count("backward_bytes_sent", back.numel() * back.element_size())
        dist.all_to_all_single(got, back, send_splits, recv_splits, group=ctx.group)
        dk = torch.zeros(shape, dtype=kdt, device=gk.device).index_add_(0, send_idx, got[:, 0].to(kdt))
        dv = torch.zeros(shape, dtype=vdt, device=gk.device).index_add_(0, send_idx, got[:, 1].to(vdt))
        return dk, dv, None, None, None, None, None
