"""Context parallelism for packed tree attention over ``torch.distributed`` (docs/training.md, "Context
parallelism").

A packed forest (rows = tokens, page size 1) is split into contiguous token ranges, one per rank. A
rank's rows see only the nodes on their paths, so it fetches only the K/V token slices of those nodes
that other ranks hold (one all-to-all, computed from the shared metadata: no request round), attends to
its own K/V while they are in flight, then to the fetched ones, and merges the two partial states by
log-sum-exp. The backward sends the fetched tokens' dK/dV back to their owners (the reverse all-to-all).

    from multiverse_kernels.distributed import tree_attention, balanced_token_ranges
    ranges = balanced_token_ranges(meta, world_size)          # or None: an even split
    out = tree_attention(q, k, v, meta, group=group, token_ranges=ranges)   # this rank's [n_r, Hq, D]

The attention variants of :func:`multiverse_kernels.tree_attention` work the same way (``window=``
in the whole forest's positions, ``softcap=``, ``sinks=`` whose gradient on each rank is its rows' share,
fp8 K/V forward only); see :func:`tree_attention`.

Nothing in the library imports this package except the integrations.
"""

from ._exchange import exchange_stats, reset_exchange_stats
from ._op import tree_attention
from ._plan import balanced_token_ranges, even_token_ranges, needed_intervals

__all__ = ["tree_attention", "balanced_token_ranges", "even_token_ranges", "needed_intervals",
           "exchange_stats", "reset_exchange_stats"]
