"""Spawning test ranks: one process group per rank, a hard deadline, a clean teardown.

Used by every multi-process test (tests/integrations/test_distributed.py, tests/integrations/test_trl.py).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextlib.contextmanager
def process_group(backend: str, rank: int, world: int, init: str) -> Iterator[None]:
    """Join a ``world``-rank group (one thread per rank, 60 s timeout) for the body, then leave it.

    Every rank finishes its collectives before any tears the group down: a rank that left early once
    made a peer's gloo thread abort ("terminate called without an active exception", SIGABRT) in CI.
    A rank whose body raised prints the traceback and skips the barrier (its peers then time out or
    are killed by :func:`spawn_ranks`).
    """
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    done = False
    try:
        yield
        done = True
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if done:
            dist.barrier()
        dist.destroy_process_group()


def _rank_main(rank: int, fn: Callable, args: tuple) -> None:
    """One rank: ``fn(rank, *args)``, then leave without interpreter finalization.

    A gloo worker thread can still hold the last reference to a finished collective's work object (and
    through it tensors with Python wrappers) after ``destroy_process_group``; if that reference is dropped
    while the interpreter is being torn down, the thread's GIL acquire aborts the process ("terminate
    called without an active exception", SIGABRT: seen in CI after every assertion had passed). A rank
    that finished its body therefore exits with ``os._exit(0)`` once its output is flushed. A rank whose
    body raised returns through ``mp.spawn`` as usual, so its traceback reaches the parent.
    """
    fn(rank, *args)
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn: Callable, args: tuple, world: int, timeout: float) -> None:
    """Run ``fn(rank, *args)`` in ``world`` processes; fail (and kill them) after ``timeout`` seconds."""
    ctx = mp.spawn(_rank_main, args=(fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"{world} ranks did not finish in {timeout} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
