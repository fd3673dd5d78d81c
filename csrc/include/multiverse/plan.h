// Host planner: the work list of docs/plan.md built in C++ (no torch), identical to the torch planner
// of multiverse_kernels/planning.py (tested against it). The hot path of planning.plan_tree_attention
// (through torch.ops.multiverse_C.plan_tree_attention), and usable by C++ engines directly.
#pragma once

#include <cstdint>
#include <vector>

#include "multiverse/plan_fields.h"

namespace multiverse {

struct HostPlan {
  // The plan's tensors and ints, in the order of multiverse_kernels/plan_format.py.
#define MULTIVERSE_X(name) std::vector<int32_t> name;
  MULTIVERSE_PLAN_TENSOR_FIELDS(MULTIVERSE_X)
#undef MULTIVERSE_X
#define MULTIVERSE_X(name) int64_t name = 0;
  MULTIVERSE_PLAN_INT_FIELDS(MULTIVERSE_X)
#undef MULTIVERSE_X
};

// num_nodes = size of node_len; num_groups = size of qo_indptr - 1; own_full may be null (causal).
// chunk_tokens > 0: every node split into chunks of that many tokens; chunk_tokens == 0: chosen per
// node from the forest and num_workers (planning.auto_chunk_tokens). group = num_qo_heads /
// num_kv_heads. window > 0: sliding window over node_pos (int32 [num_nodes], start position of each
// node; required then): reader_lo = max(0, pos(row) - node_pos[n] - window + 1), readers that see no
// token dropped, chunks outside every reader's window not planned (docs/plan.md). Metadata must be
// valid (ForestMetadata.validate); throws std::invalid_argument on bad arguments.
HostPlan plan_tree_attention(const int32_t* node_len, int32_t num_nodes, const int32_t* qo_indptr,
                             const int32_t* vis_indptr, const int32_t* vis_nodes, int32_t num_groups,
                             const bool* own_full, int32_t chunk_tokens, int32_t rows_per_tile,
                             int32_t group = 1, int32_t num_kv_heads = 1, int32_t num_workers = 1,
                             const int32_t* node_pos = nullptr, int32_t window = 0);

}  // namespace multiverse
