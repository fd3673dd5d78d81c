"""Reference backend (plain PyTorch): the specification every other backend is tested against."""

from .. import register
from .append_paged_kv import append_paged_kv
from .merge_states import merge_states
from .tree_attention import tree_attention
from .tree_attention_backward import tree_attention_backward

_ALL = ("cpu", "cuda", "meta", "mps", "xpu")
register("tree_attention", "reference", _ALL)(tree_attention)
register("merge_states", "reference", _ALL)(merge_states)
register("append_paged_kv", "reference", _ALL)(append_paged_kv)
register("tree_attention_backward", "reference", _ALL)(tree_attention_backward)

# The reference is the specification of every attention variant (multiverse_kernels/variants.py).
tree_attention.variants = frozenset({"window", "softcap", "sinks", "fp8"})
tree_attention_backward.variants = frozenset({"window", "softcap", "sinks"})
