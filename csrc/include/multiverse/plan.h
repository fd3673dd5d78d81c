// Host planner: the work list of docs/plan.md built in C++ (no torch), identical to
// multiverse_kernels/planning.py (tested against it). For C++ engines and the torch op
// multiverse_C::tree_attention, which plans internally.
#pragma once

#include <cstdint>
#include <vector>

namespace multiverse {

struct HostPlan {
  // Fields in TreePlan.TENSOR_FIELDS order.
  std::vector<int32_t> reader_row, reader_limit, item_node, item_kv_start, item_kv_len, item_reader_start,
      item_num_readers, item_partial_start, row_partial_indptr, row_partial_indices, merge_rows;
  // TreePlan.INT_FIELDS order.
  int64_t num_readers = 0, num_items = 0, num_partials = 0, num_merge_rows = 0, max_item_readers = 0,
          chunk_tokens = 0, rows_per_tile = 0;
};

// num_nodes = size of node_len; num_groups = size of qo_indptr - 1; own_full may be null (causal).
// Metadata must be valid (ForestMetadata.validate); throws std::invalid_argument on bad sizes.
HostPlan plan_tree_attention(const int32_t* node_len, int32_t num_nodes, const int32_t* qo_indptr,
                             const int32_t* vis_indptr, const int32_t* vis_nodes, int32_t num_groups,
                             const bool* own_full, int32_t chunk_tokens, int32_t rows_per_tile);

}  // namespace multiverse
