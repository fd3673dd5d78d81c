// A paged engine's per-request block tables -> a KV forest, in C++ (no torch): the conversion of
// multiverse_kernels/integrations/vllm_sharing.py (its module docstring is the spec; its vectorised
// torch implementation gives identical results, tested). The CPU hot path of
// vllm_sharing.forest_from_block_table (through torch.ops.multiverse_C.forest_from_block_table), and
// usable by a C++ engine directly before absorb_tiny_nodes / plan_tree_attention.
#pragma once

#include <cstdint>
#include <vector>

namespace multiverse {

// A forest in ForestMetadata's field layout (int32 lists), plus what the conversion found.
struct TableForest {
  std::vector<int32_t> node_page_indptr, node_page_indices, node_len, qo_indptr, vis_indptr, vis_nodes,
      node_pos;
  int64_t listed_blocks = 0;  // blocks listed by all requests' tables, up to their lengths
  int64_t unique_blocks = 0;  // distinct blocks among them (= listed_blocks when nothing is shared)
  int64_t shared_nodes = 0;   // nodes read by more than one request
  bool fallback = false;      // the sharing check failed: every request got one node
};

// block_table: num_reqs rows of at least ceil(seq_lens[r] / block_size) entries each (row r starts at
// block_table + r * row_stride); seq_lens[r]: the request's tokens after this step; query_start_loc
// [num_reqs + 1]: its query rows (its last tokens). share = false: one node per request. Only a request's
// full blocks before its first query token are shared. Throws std::invalid_argument on bad arguments
// (negative lengths, a table narrower than a request's blocks, a negative block id where it is read).
void forest_from_block_table(const int32_t* block_table, int64_t row_stride, int64_t table_width,
                             int32_t num_reqs, const int32_t* seq_lens, const int32_t* query_start_loc,
                             int32_t block_size, bool share, TableForest* out);

}  // namespace multiverse
