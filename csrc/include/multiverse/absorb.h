// Tiny-node absorption in C++ (no torch): the metadata rewrite of multiverse_kernels/absorption.py
// (its module docstring is the spec; its torch implementation gives identical results, tested). The hot
// path of absorption.absorb_tiny_nodes (through torch.ops.multiverse_C.absorb_tiny_nodes), and usable
// by C++ engines directly before plan_tree_attention (multiverse/plan.h).
#pragma once

#include <cstdint>
#include <vector>

namespace multiverse {

// A forest's node and visibility arrays (ForestMetadata's fields of the same names; qo_indptr, the
// page size and own_full are unchanged by absorption, so not repeated here).
struct HostForest {
  std::vector<int32_t> node_page_indptr, node_page_indices, node_len, vis_indptr, vis_nodes;
};

// Folds tiny nodes into their successors where that moves fewer bytes (absorption.py). num_nodes =
// size of node_len (node_page_indptr has num_nodes + 1 entries, its last = the number of pages);
// num_groups = size of qo_indptr - 1 (vis_indptr has as many entries as qo_indptr). group =
// num_qo_heads / num_kv_heads; kv_elem_size = bytes per K/V element; max_absorbed_tokens = the
// longest chain absorbed into a successor (absorption.MAX_ABSORBED_TOKENS).
//
// Returns false when nothing is absorbed (*out untouched); else true with *out the rewritten forest:
// the original nodes (same ids), then one virtual node per segment end in increasing order of that
// end's id, and every list with q_len > 0 rewritten (the others copied). Metadata must be valid
// (ForestMetadata.validate); throws std::invalid_argument on bad arguments.
bool absorb_tiny_nodes(const int32_t* node_page_indptr, const int32_t* node_page_indices,
                       const int32_t* node_len, int32_t num_nodes, const int32_t* qo_indptr,
                       const int32_t* vis_indptr, const int32_t* vis_nodes, int32_t num_groups,
                       int32_t page_size, int32_t group, int32_t head_dim, int32_t kv_elem_size,
                       int32_t max_absorbed_tokens, HostForest* out);

}  // namespace multiverse
