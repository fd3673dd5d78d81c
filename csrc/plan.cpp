// Host planner (see multiverse/plan.h and docs/plan.md). Sequential; O(readers) apart from sorting
// each node's readers (skipped when they are already in order, as in decode).
#include "multiverse/plan.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>

namespace multiverse {

namespace {
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

HostPlan plan_tree_attention(const int32_t* node_len, int32_t num_nodes, const int32_t* qo_indptr,
                             const int32_t* vis_indptr, const int32_t* vis_nodes, int32_t num_groups,
                             const bool* own_full, int32_t chunk_tokens, int32_t rows_per_tile, int32_t group,
                             int32_t num_kv_heads, int32_t num_workers, const int32_t* node_pos, int32_t window) {
  if (chunk_tokens < 0) throw std::invalid_argument("chunk_tokens: expected a positive int (0: automatic)");
  if (rows_per_tile < 1) throw std::invalid_argument("rows_per_tile: expected a positive int");
  if (group < 1 || num_kv_heads < 1 || num_workers < 1)
    throw std::invalid_argument("num_workers: expected positive group, num_kv_heads and num_workers");
  if (window < 0) throw std::invalid_argument("window: expected a positive int (0: no window)");
  if (window > 0 && node_pos == nullptr) throw std::invalid_argument("node_pos: a window needs node positions");
  HostPlan p;
  p.rows_per_tile = rows_per_tile;
  p.num_workers = chunk_tokens == 0 ? num_workers : 0;
  p.window = window;
  const int64_t total_q = num_groups > 0 ? qo_indptr[num_groups] : 0;

  // A reader's window lower bound lo = max(0, pos(row) - node_pos[n] - window + 1) (0 without a window);
  // readers with lo >= limit see nothing of their node and are dropped.
  const auto reader_lo = [&](int32_t g, int32_t own, int32_t q_len, int32_t i, int32_t n) -> int32_t {
    const int64_t rpos = static_cast<int64_t>(node_pos[own]) + node_len[own] - q_len + i;
    const int64_t lo = rpos - node_pos[n] - window + 1;
    (void)g;
    return lo > 0 ? static_cast<int32_t>(std::min<int64_t>(lo, INT32_MAX)) : 0;
  };
  const auto reader_limit = [&](int32_t g, int32_t e, int32_t q_len, int32_t i, int32_t nl) -> int32_t {
    const bool full = e != vis_indptr[g + 1] - 1 || (own_full != nullptr && own_full[g]);
    return full ? nl : nl - q_len + i + 1;
  };

  // Readers: every (row, visible non-empty node) with a visible token, bucketed by node (counting sort).
  // Within a node they arrive in increasing row order (groups' rows are increasing ranges).
  std::vector<int32_t> n_readers(num_nodes, 0);
  int64_t R = 0;
  for (int32_t g = 0; g < num_groups; ++g) {
    const int32_t q_len = qo_indptr[g + 1] - qo_indptr[g];
    const int32_t own = q_len > 0 ? vis_nodes[vis_indptr[g + 1] - 1] : 0;
    for (int32_t e = vis_indptr[g]; e < vis_indptr[g + 1]; ++e) {
      const int32_t n = vis_nodes[e];
      if (n < 0 || n >= num_nodes) throw std::invalid_argument("vis_nodes: node id out of range");
      const int32_t nl = node_len[n];
      if (nl <= 0) continue;
      if (window == 0) {
        n_readers[n] += q_len;
        R += q_len;
        continue;
      }
      for (int32_t i = 0; i < q_len; ++i)
        if (reader_lo(g, own, q_len, i, n) < reader_limit(g, e, q_len, i, nl)) { ++n_readers[n]; ++R; }
    }
  }
  std::vector<int32_t> node_start(num_nodes + 1, 0);
  for (int32_t n = 0; n < num_nodes; ++n) node_start[n + 1] = node_start[n] + n_readers[n];
  std::vector<int32_t> row(R), limit(R), lo(R, 0), fill(node_start.begin(), node_start.end() - 1);
  std::vector<int32_t> node_lo_min(num_nodes, INT32_MAX);  // smallest lo among the node's readers
  for (int32_t g = 0; g < num_groups; ++g) {
    const int32_t q_len = qo_indptr[g + 1] - qo_indptr[g];
    const int32_t own = q_len > 0 ? vis_nodes[vis_indptr[g + 1] - 1] : 0;
    for (int32_t e = vis_indptr[g]; e < vis_indptr[g + 1]; ++e) {
      const int32_t n = vis_nodes[e], nl = node_len[n];
      if (nl <= 0) continue;
      int32_t at = fill[n];
      if (window == 0) {  // (the plain path: every reader kept, lo = 0)
        const bool full = e != vis_indptr[g + 1] - 1 || (own_full != nullptr && own_full[g]);
        for (int32_t i = 0; i < q_len; ++i, ++at) {
          row[at] = qo_indptr[g] + i;
          limit[at] = full ? nl : nl - q_len + i + 1;
        }
        fill[n] = at;
        continue;
      }
      for (int32_t i = 0; i < q_len; ++i) {
        const int32_t lim = reader_limit(g, e, q_len, i, nl);
        const int32_t l = window > 0 ? reader_lo(g, own, q_len, i, n) : 0;
        if (l >= lim) continue;
        row[at] = qo_indptr[g] + i;
        limit[at] = lim;
        lo[at] = l;
        node_lo_min[n] = std::min(node_lo_min[n], l);
        ++at;
      }
      fill[n] = at;
    }
  }

  // Chunk length of every node (fixed, or planning.auto_chunk_tokens over the tokens its readers see:
  // span = node_len without a window).
  std::vector<int32_t> chunk(num_nodes, chunk_tokens);
  int64_t plan_chunk = chunk_tokens;
  if (chunk_tokens == 0) {
    int64_t work = 0;
    for (int32_t n = 0; n < num_nodes; ++n)
      if (n_readers[n] > 0) {
        const int64_t span = window > 0 ? node_len[n] - node_lo_min[n] : node_len[n];
        work += ceil_div(n_readers[n], rows_per_tile) * span;
      }
    work *= num_kv_heads;
    const int64_t budget = ceil_div(work, num_workers);
    const int64_t base = std::max<int64_t>(MULTIVERSE_PLAN_MIN_CHUNK_TOKENS, ceil_div(budget, 64) * 64);
    plan_chunk = 1;
    for (int32_t n = 0; n < num_nodes; ++n) {
      const int64_t packed = ceil_div(static_cast<int64_t>(n_readers[n]) * group, 64) * 64;
      const int64_t c = std::min<int64_t>(std::max(packed, base), std::max(node_len[n], 1));
      chunk[n] = static_cast<int32_t>(c);
      if (n_readers[n] > 0) plan_chunk = std::max(plan_chunk, c);
    }
  }
  p.chunk_tokens = plan_chunk;

  // Partials of every row: a reader sees chunks lo / chunk .. ceil(limit / chunk) - 1 of its node.
  std::vector<int32_t> row_cnt(total_q, 0);
  for (int32_t n = 0; n < num_nodes; ++n)
    for (int32_t i = node_start[n]; i < node_start[n + 1]; ++i)
      row_cnt[row[i]] += static_cast<int32_t>(ceil_div(limit[i], chunk[n]) - (window > 0 ? lo[i] / chunk[n] : 0));

  // Reader order within a node: merged rows before direct rows (one partial), limit descending, lo
  // descending, row. Without a window the readers of chunk c >= 1 (limit > c * chunk; never direct) are
  // a prefix; with one, those of chunk c are the readers of that prefix with lo < (c + 1) * chunk.
  struct Rd { int32_t direct, limit, lo, row; };
  const auto less = [](const Rd& x, const Rd& y) {
    if (x.direct != y.direct) return x.direct < y.direct;
    if (x.limit != y.limit) return x.limit > y.limit;
    if (x.lo != y.lo) return x.lo > y.lo;
    return x.row < y.row;
  };
  std::vector<Rd> tmp;
  for (int32_t n = 0; n < num_nodes; ++n) {
    const int32_t a = node_start[n], b = node_start[n + 1];
    // Already in order (decode), or in exactly the reverse order (a causal node's own rows arrive with
    // limits increasing: reversed in O(n) instead of sorted)?
    bool sorted = true, reversed = true;
    for (int32_t i = a + 1; i < b && (sorted || reversed); ++i) {
      const Rd x{row_cnt[row[i - 1]] == 1, limit[i - 1], lo[i - 1], row[i - 1]};
      const Rd y{row_cnt[row[i]] == 1, limit[i], lo[i], row[i]};
      const bool lt = less(x, y);
      sorted = sorted && lt;
      reversed = reversed && !lt;  // keys are distinct (rows are)
    }
    if (sorted) continue;
    if (reversed) {
      std::reverse(row.begin() + a, row.begin() + b);
      std::reverse(limit.begin() + a, limit.begin() + b);
      std::reverse(lo.begin() + a, lo.begin() + b);
      continue;
    }
    tmp.resize(b - a);
    for (int32_t i = a; i < b; ++i) tmp[i - a] = {row_cnt[row[i]] == 1, limit[i], lo[i], row[i]};
    std::sort(tmp.begin(), tmp.end(), less);
    for (int32_t i = a; i < b; ++i) { row[i] = tmp[i - a].row; limit[i] = tmp[i - a].limit; lo[i] = tmp[i - a].lo; }
  }
  std::vector<int32_t> merged_before(R + 1, 0);  // merged readers among the first i
  for (int64_t i = 0; i < R; ++i) merged_before[i + 1] = merged_before[i] + (row_cnt[row[i]] != 1);

  // Items: per node, per chunk with readers, per maximal run of consecutive readers (in the order above)
  // that see the chunk, per tile of rows_per_tile of the run.
  int64_t slots = 0, max_readers = 0;
  const auto emit = [&](int32_t n, int32_t c, int32_t ch, int32_t rs0, int32_t count) {
    for (int32_t t0 = 0; t0 < count; t0 += rows_per_tile) {
      const int32_t rs = rs0 + t0, nr = std::min(rows_per_tile, count - t0);
      p.item_node.push_back(n);
      p.item_kv_start.push_back(c * ch);
      p.item_kv_len.push_back(std::min(ch, node_len[n] - c * ch));
      p.item_reader_start.push_back(rs);
      p.item_num_readers.push_back(nr);
      p.item_partial_start.push_back(static_cast<int32_t>(slots));
      slots += merged_before[rs + nr] - merged_before[rs];
      max_readers = std::max<int64_t>(max_readers, nr);
    }
  };
  std::vector<int32_t> bucket_off, bucket, fill_at;
  for (int32_t n = 0; n < num_nodes; ++n) {
    const int32_t a = node_start[n], b = node_start[n + 1];
    if (a == b) continue;
    const int32_t ch = chunk[n];
    if (window == 0) {
      int32_t seen = b - a;  // readers with k > c (a prefix for c >= 1)
      for (int32_t c = 0; seen > 0; ++c) {
        if (c > 0)
          while (seen > 0 && ceil_div(limit[a + seen - 1], ch) <= c) --seen;
        emit(n, c, ch, a, seen);
      }
      continue;
    }
    // Window: bucket the node's readers by the chunks they see (in reader order), then emit runs.
    int32_t max_limit = 0;
    for (int32_t i = a; i < b; ++i) max_limit = std::max(max_limit, limit[i]);
    const int32_t nc = static_cast<int32_t>(ceil_div(max_limit, ch));
    bucket_off.assign(nc + 1, 0);  // difference array of the readers per chunk, then bucket starts
    for (int32_t i = a; i < b; ++i) {
      ++bucket_off[lo[i] / ch];
      --bucket_off[ceil_div(limit[i], ch)];
    }
    int32_t run = 0, total = 0;
    for (int32_t c = 0; c < nc; ++c) {
      run += bucket_off[c];
      bucket_off[c] = total;
      total += run;
    }
    bucket_off[nc] = total;
    bucket.resize(total);
    fill_at.assign(bucket_off.begin(), bucket_off.end() - 1);
    for (int32_t i = a; i < b; ++i) {
      const int32_t c1 = static_cast<int32_t>(ceil_div(limit[i], ch));
      for (int32_t c = lo[i] / ch; c < c1; ++c) bucket[fill_at[c]++] = i;
    }
    for (int32_t c = 0; c < nc; ++c) {
      const int32_t s0 = bucket_off[c], s1 = bucket_off[c + 1];
      for (int32_t x = s0; x < s1;) {
        int32_t y = x + 1;
        while (y < s1 && bucket[y] == bucket[y - 1] + 1) ++y;
        emit(n, c, ch, bucket[x], y - x);
        x = y;
      }
    }
  }
  p.num_readers = R;
  p.num_items = static_cast<int64_t>(p.item_node.size());
  p.num_partials = slots;
  p.workspace_slots = slots;
  p.max_item_readers = max_readers;

  // Each row's partials: workspace slots in increasing order, or -1 for a row's only partial.
  p.row_partial_indptr.assign(total_q + 1, 0);
  for (int64_t r = 0; r < total_q; ++r) p.row_partial_indptr[r + 1] = p.row_partial_indptr[r] + row_cnt[r];
  p.row_partial_indices.assign(p.row_partial_indptr[total_q], -1);
  std::vector<int32_t> pos(p.row_partial_indptr.begin(), p.row_partial_indptr.end() - 1);
  for (int64_t w = 0; w < p.num_items; ++w) {
    const int32_t rs = p.item_reader_start[w];
    const int32_t m = merged_before[rs + p.item_num_readers[w]] - merged_before[rs];
    for (int32_t j = 0; j < m; ++j) p.row_partial_indices[pos[row[rs + j]]++] = p.item_partial_start[w] + j;
  }
  for (int64_t r = 0; r < total_q; ++r)
    if (row_cnt[r] != 1) p.merge_rows.push_back(static_cast<int32_t>(r));
  p.num_merge_rows = static_cast<int64_t>(p.merge_rows.size());
  p.reader_row = std::move(row);
  p.reader_limit = std::move(limit);
  p.reader_lo = std::move(lo);
  return p;
}

}  // namespace multiverse
