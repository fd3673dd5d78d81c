"""Public ops; each is also ``torch.ops.multiverse.<name>``."""

from .append_paged_kv import append_paged_kv
from .merge_states import merge_states
from .tree_attention import tree_attention
from .tree_attention_backward import tree_attention_backward

__all__ = ["tree_attention", "tree_attention_backward", "merge_states", "append_paged_kv"]
