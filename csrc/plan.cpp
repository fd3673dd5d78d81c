// Host planner (see multiverse/plan.h and docs/plan.md). Sequential, O(readers log readers).
#include "multiverse/plan.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>

namespace multiverse {

HostPlan plan_tree_attention(const int32_t* node_len, int32_t num_nodes, const int32_t* qo_indptr,
                             const int32_t* vis_indptr, const int32_t* vis_nodes, int32_t num_groups,
                             const bool* own_full, int32_t chunk_tokens, int32_t rows_per_tile) {
  if (chunk_tokens < 1) throw std::invalid_argument("chunk_tokens: expected a positive int");
  if (rows_per_tile < 1) throw std::invalid_argument("rows_per_tile: expected a positive int");
  HostPlan p;
  p.chunk_tokens = chunk_tokens;
  p.rows_per_tile = rows_per_tile;
  const int64_t total_q = num_groups > 0 ? qo_indptr[num_groups] : 0;

  // Readers: every (row, visible non-empty node), sorted by (node, row).
  struct Reader { int64_t key; int32_t node, row, limit; };
  std::vector<Reader> rd;
  for (int32_t g = 0; g < num_groups; ++g) {
    const int32_t q_len = qo_indptr[g + 1] - qo_indptr[g];
    for (int32_t e = vis_indptr[g]; e < vis_indptr[g + 1]; ++e) {
      const int32_t n = vis_nodes[e];
      if (n < 0 || n >= num_nodes) throw std::invalid_argument("vis_nodes: node id out of range");
      const int32_t nl = node_len[n];
      if (nl <= 0) continue;
      const bool full = e != vis_indptr[g + 1] - 1 || (own_full != nullptr && own_full[g]);
      for (int32_t i = 0; i < q_len; ++i) {
        const int32_t row = qo_indptr[g] + i;
        rd.push_back({static_cast<int64_t>(n) * (total_q + 1) + row, n, row, full ? nl : nl - q_len + i + 1});
      }
    }
  }
  std::sort(rd.begin(), rd.end(), [](const Reader& a, const Reader& b) { return a.key < b.key; });
  p.num_readers = static_cast<int64_t>(rd.size());
  p.reader_row.resize(rd.size());
  p.reader_limit.resize(rd.size());
  std::vector<int64_t> n_readers(num_nodes, 0), node_start(num_nodes + 1, 0);
  for (size_t i = 0; i < rd.size(); ++i) {
    p.reader_row[i] = rd[i].row;
    p.reader_limit[i] = rd[i].limit;
    ++n_readers[rd[i].node];
  }
  for (int32_t n = 0; n < num_nodes; ++n) node_start[n + 1] = node_start[n] + n_readers[n];

  // Items: per node, chunk-major then reader tile.
  int64_t partial = 0;
  for (int32_t n = 0; n < num_nodes; ++n) {
    if (n_readers[n] == 0) continue;
    const int64_t tiles = (n_readers[n] + rows_per_tile - 1) / rows_per_tile;
    const int64_t chunks = (static_cast<int64_t>(node_len[n]) + chunk_tokens - 1) / chunk_tokens;
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t t = 0; t < tiles; ++t) {
        const int32_t start = static_cast<int32_t>(c * chunk_tokens);
        const int32_t nr = static_cast<int32_t>(std::min<int64_t>(rows_per_tile, n_readers[n] - t * rows_per_tile));
        p.item_node.push_back(n);
        p.item_kv_start.push_back(start);
        p.item_kv_len.push_back(std::min(chunk_tokens, node_len[n] - start));
        p.item_reader_start.push_back(static_cast<int32_t>(node_start[n] + t * rows_per_tile));
        p.item_num_readers.push_back(nr);
        p.item_partial_start.push_back(static_cast<int32_t>(partial));
        partial += nr;
        p.max_item_readers = std::max<int64_t>(p.max_item_readers, nr);
      }
  }
  p.num_items = static_cast<int64_t>(p.item_node.size());
  p.num_partials = partial;

  // Merge: the partial slots of each row in increasing slot order (counting sort by row).
  std::vector<int32_t> slot_row(partial);
  for (int64_t w = 0; w < p.num_items; ++w)
    for (int32_t j = 0; j < p.item_num_readers[w]; ++j)
      slot_row[p.item_partial_start[w] + j] = p.reader_row[p.item_reader_start[w] + j];
  p.row_partial_indptr.assign(total_q + 1, 0);
  for (int32_t r : slot_row) ++p.row_partial_indptr[r + 1];
  for (int64_t r = 0; r < total_q; ++r) p.row_partial_indptr[r + 1] += p.row_partial_indptr[r];
  p.row_partial_indices.resize(partial);
  std::vector<int32_t> fill(p.row_partial_indptr.begin(), p.row_partial_indptr.end() - 1);
  for (int64_t s = 0; s < partial; ++s) p.row_partial_indices[fill[slot_row[s]]++] = static_cast<int32_t>(s);
  for (int64_t r = 0; r < total_q; ++r)
    if (p.row_partial_indptr[r + 1] - p.row_partial_indptr[r] != 1) p.merge_rows.push_back(static_cast<int32_t>(r));
  p.num_merge_rows = static_cast<int64_t>(p.merge_rows.size());
  return p;
}

}  // namespace multiverse
