"""multiverse_kernels: tree-structured paged attention for generation that branches.

Read every shared KV page once per step for all the branches that see it; never build an L x L mask.
See README.md and docs/ for the metadata format and the API.
"""

from .convert import from_flashinfer, from_page_lists, from_sglang, to_flashinfer, to_sglang
from .dense_mask import dense_attention, dense_mask, key_slots
from .forest import KVForest, OutOfPages
from .metadata import ForestMetadata, MetadataError
from .ops import append_paged_kv, merge_states, tree_attention

__version__ = "0.1.0"

__all__ = [
    "ForestMetadata",
    "MetadataError",
    "KVForest",
    "OutOfPages",
    "tree_attention",
    "merge_states",
    "append_paged_kv",
    "dense_mask",
    "dense_attention",
    "key_slots",
    "from_page_lists",
    "from_flashinfer",
    "from_sglang",
    "to_flashinfer",
    "to_sglang",
]
