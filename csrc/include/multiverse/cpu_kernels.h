// CPU kernels (csrc/cpu/*.cpp). Raw pointers + params structs; no torch types.
#pragma once

#include "multiverse/params.h"

namespace multiverse::cpu {

// Partial (out, lse) of every (work item, kv head) of the plan into p.partial_out / p.partial_lse.
void tree_attention(const TreeAttentionParams& p);

// Gradients dq, dk, dv (float32, accumulated into the zeroed p.dq / p.dk / p.dv) of tree_attention
// over the forward's plan (see TreeAttentionBackwardParams).
void tree_attention_backward(const TreeAttentionBackwardParams& p);

// Log-sum-exp merge (see MergeParams).
void merge_states(const MergeParams& p);

// Scatter new tokens' K/V into their nodes' pages.
void append_paged_kv(const AppendParams& p);

}  // namespace multiverse::cpu
