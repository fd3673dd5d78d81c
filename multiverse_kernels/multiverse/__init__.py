"""Multiverse (parallel reasoning with ``<Parallel> <Goal> <Outline> <Path> <Conclusion>`` tags).

- :class:`MultiverseTags`: the tag token ids (``MultiverseTags.from_tokenizer``).
- :func:`parse`: positions, ``dense_mask()`` (for checking) and the packed-training forest of a sequence.
- :class:`MultiverseDriver`: fork/join generation over a :class:`~multiverse_kernels.KVForest`.

See docs/multiverse.md.
"""

from .driver import Batch, BranchInfo, DriverError, MultiverseDriver
from .parse import Block, MultiverseParseError, MultiverseStructure, parse
from .tags import TAG_STRINGS, MultiverseTags

__all__ = [
    "MultiverseTags",
    "TAG_STRINGS",
    "parse",
    "MultiverseStructure",
    "Block",
    "MultiverseParseError",
    "MultiverseDriver",
    "Batch",
    "BranchInfo",
    "DriverError",
]
