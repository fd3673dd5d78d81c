// Block tables -> forest (see multiverse/block_tables.h and multiverse_kernels/integrations/
// vllm_sharing.py). Sequential; O(listed blocks) (+ the id range when it is dense). Step for step the torch
// implementation: per-block reader counts, each request's shared leading run cut where the count
// changes, one node per distinct first block, then the check that makes any table exact.
#include "multiverse/block_tables.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace multiverse {

namespace {

// int32 values keyed by block id: a dense array when the ids are small non-negative ints (an engine's
// block ids index its block pool), else a hash map. Absent keys read 0.
class IdMap {
 public:
  IdMap(int32_t lo, int32_t hi, int64_t n) : dense_(lo >= 0 && hi < std::max<int64_t>(int64_t{1} << 16, 16 * n)) {
    if (dense_) {
      vals_.assign(static_cast<size_t>(std::max(hi, 0)) + 1, 0);
    } else {
      map_.reserve(static_cast<size_t>(n));
    }
  }
  int32_t& at(int32_t id) { return dense_ ? vals_[static_cast<size_t>(id)] : map_[id]; }

 private:
  bool dense_;
  std::vector<int32_t> vals_;
  std::unordered_map<int32_t, int32_t> map_;
};

// One node per request (what a per-request kernel reads).
void unshared(const int32_t* tab, int64_t stride, int32_t R, const std::vector<int32_t>& seq,
              const std::vector<int32_t>& nblk, TableForest* out) {
  out->node_page_indptr.assign(1, 0);
  out->node_page_indices.clear();
  for (int32_t r = 0; r < R; ++r) {
    out->node_page_indices.insert(out->node_page_indices.end(), tab + r * stride, tab + r * stride + nblk[r]);
    out->node_page_indptr.push_back(static_cast<int32_t>(out->node_page_indices.size()));
  }
  out->node_len = seq;
  out->vis_indptr.resize(R + 1);
  out->vis_nodes.resize(R);
  for (int32_t r = 0; r <= R; ++r) out->vis_indptr[r] = r;
  for (int32_t r = 0; r < R; ++r) out->vis_nodes[r] = r;
  out->node_pos.assign(R, 0);
  out->unique_blocks = out->listed_blocks;
  out->shared_nodes = 0;
}

}  // namespace

void forest_from_block_table(const int32_t* tab, int64_t stride, int64_t width, int32_t R, const int32_t* seq_lens,
                             const int32_t* qo, int32_t bs, bool share, TableForest* out) {
  if (out == nullptr) throw std::invalid_argument("out: expected a TableForest to fill");
  if (bs < 1) throw std::invalid_argument("block_size: expected a positive int, got " + std::to_string(bs));
  if (R < 0) throw std::invalid_argument("num_reqs: expected a non-negative int");
  std::vector<int32_t> seq(seq_lens, seq_lens + R), nblk(R), nshare(R);
  int64_t listed = 0;
  for (int32_t r = 0; r < R; ++r) {
    if (seq[r] < 0) throw std::invalid_argument("seq_lens: expected non-negative lengths");
    nblk[r] = static_cast<int32_t>((static_cast<int64_t>(seq[r]) + bs - 1) / bs);
    if (nblk[r] > width)
      throw std::invalid_argument("block_table: expected at least ceil(seq_lens / block_size) = " +
                                  std::to_string(nblk[r]) + " columns in row " + std::to_string(r) + ", got " +
                                  std::to_string(width));
    const int64_t before_q = static_cast<int64_t>(seq[r]) - (qo[r + 1] - qo[r]);
    nshare[r] = static_cast<int32_t>(std::max<int64_t>(before_q / bs, 0));  // full blocks before the queries
    listed += nblk[r];
  }
  out->listed_blocks = listed;
  out->fallback = false;
  out->qo_indptr.assign(qo, qo + R + 1);
  const auto row = [&](int32_t r) { return tab + r * stride; };
  if (!share || R < 2) return unshared(tab, stride, R, seq, nblk, out);

  // Readers of each block among the shareable positions (ids range over the listed ones).
  int64_t cand = 0;
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = -1;
  for (int32_t r = 0; r < R; ++r) {
    for (int32_t j = 0; j < nblk[r]; ++j) {
      if (j < nshare[r] && row(r)[j] < 0) throw std::invalid_argument("block_table: expected non-negative block ids");
      lo = std::min(lo, row(r)[j]);
      hi = std::max(hi, row(r)[j]);
    }
    cand += nshare[r];
  }
  if (cand < 2) return unshared(tab, stride, R, seq, nblk, out);
  IdMap count(lo, hi, listed);
  for (int32_t r = 0; r < R; ++r) {
    for (int32_t j = 0; j < nshare[r]; ++j) ++count.at(row(r)[j]);
  }
  const auto cnt = [&](int32_t r, int32_t j) { return j < nshare[r] ? count.at(row(r)[j]) : 0; };
  // Each request's shared leading blocks (read by >= 2 requests), cut into segments where the count
  // changes (with prefix-cached blocks, a run of equal count is a run read by the same requests).
  std::vector<int32_t> lead(R), seg_r, seg_j0, seg_len, seg_first(R + 1, 0);
  int32_t max_lead = 0;
  for (int32_t r = 0; r < R; ++r) {
    int32_t j = 0, prev = -1;
    while (j < nshare[r]) {
      const int32_t c = cnt(r, j);
      if (c < 2) break;
      if (c != prev) {
        seg_r.push_back(r);
        seg_j0.push_back(j);
        seg_len.push_back(0);
      }
      ++seg_len.back();
      prev = c;
      ++j;
    }
    lead[r] = j;
    max_lead = std::max(max_lead, j);
    seg_first[r + 1] = static_cast<int32_t>(seg_r.size());
  }
  if (max_lead == 0) return unshared(tab, stride, R, seq, nblk, out);
  // A node per distinct first block, in order of its first segment (the representative).
  const int32_t S = static_cast<int32_t>(seg_r.size());
  IdMap first(lo, hi, S);  // first block -> 1 + its representative segment (0: none yet)
  std::vector<int32_t> rep(S), seg_node(S), rep_node(S, -1);
  int32_t Ns = 0;
  for (int32_t s = 0; s < S; ++s) {
    int32_t& f = first.at(row(seg_r[s])[seg_j0[s]]);
    if (f == 0) f = s + 1;
    rep[s] = f - 1;
    if (rep[s] == s) rep_node[s] = Ns++;
    seg_node[s] = rep_node[rep[s]];
  }
  // The check: every segment has its representative's start, length and blocks; else nothing is shared.
  bool ok = true;
  for (int32_t s = 0; s < S && ok; ++s) {
    const int32_t t = rep[s];
    ok = seg_j0[s] == seg_j0[t] && seg_len[s] == seg_len[t] &&
         std::equal(row(seg_r[s]) + seg_j0[s], row(seg_r[s]) + seg_j0[s] + seg_len[s], row(seg_r[t]) + seg_j0[t]);
  }
  if (!ok) {
    unshared(tab, stride, R, seq, nblk, out);
    out->fallback = true;
    return;
  }
  // Shared nodes (the representatives' runs), then one own node per request (its other blocks).
  out->node_page_indptr.assign(1, 0);
  out->node_page_indices.clear();
  out->node_len.clear();
  out->node_pos.clear();
  const auto add_node = [&](const int32_t* blocks, int32_t n, int32_t len, int32_t pos) {
    out->node_page_indices.insert(out->node_page_indices.end(), blocks, blocks + n);
    out->node_page_indptr.push_back(static_cast<int32_t>(out->node_page_indices.size()));
    out->node_len.push_back(len);
    out->node_pos.push_back(pos);
  };
  for (int32_t s = 0; s < S; ++s) {
    if (rep[s] == s) add_node(row(seg_r[s]) + seg_j0[s], seg_len[s], seg_len[s] * bs, seg_j0[s] * bs);
  }
  for (int32_t r = 0; r < R; ++r) add_node(row(r) + lead[r], nblk[r] - lead[r], seq[r] - lead[r] * bs, lead[r] * bs);
  // Visibility: each request's segments' nodes in order, then its own node.
  out->vis_indptr.assign(1, 0);
  out->vis_nodes.clear();
  for (int32_t r = 0; r < R; ++r) {
    for (int32_t s = seg_first[r]; s < seg_first[r + 1]; ++s) out->vis_nodes.push_back(seg_node[s]);
    out->vis_nodes.push_back(Ns + r);
    out->vis_indptr.push_back(static_cast<int32_t>(out->vis_nodes.size()));
  }
  IdMap seen(lo, hi, listed);
  int64_t unique = 0;
  for (int32_t r = 0; r < R; ++r) {
    for (int32_t j = 0; j < nblk[r]; ++j) unique += seen.at(row(r)[j])++ == 0;
  }
  out->unique_blocks = unique;
  out->shared_nodes = Ns;
}

}  // namespace multiverse
