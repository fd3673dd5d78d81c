// Standalone check of the CPU library without torch (how a C++ engine calls it): a hand-built forest
// (a 37-token prefix in pages of 4, two 5-token children decoding one token each) and its plan, run
// through multiverse::cpu::tree_attention + merge_states and compared with a naive double-precision
// attention. Exit status 0 on success. Built by CMakeLists.txt (target multiverse_cpu_smoke_test).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "multiverse/cpu_kernels.h"
#include "multiverse/index_math.h"

int main() {
  using namespace multiverse;
  const int Hq = 4, Hk = 2, D = 40, PS = 4, pages = 14, total_q = 2;
  // Forest: node 0 = pages 0..9 (37 tokens), node 1 = pages 10..11 (5), node 2 = pages 12..13 (5).
  std::vector<int32_t> indptr = {0, 10, 12, 14}, indices(14), node_len = {37, 5, 5};
  for (int i = 0; i < 14; ++i) indices[i] = (i * 5) % 14;  // shuffled page order
  // Groups: row 0 sees {0, 1}, row 1 sees {0, 2} (decode: each own node fully visible).
  // Plan (docs/plan.md): readers by node then row; one item per node holding all its readers.
  std::vector<int32_t> reader_row = {0, 1, 0, 1}, reader_limit = {37, 37, 5, 5};
  std::vector<int32_t> item_node = {0, 1, 2}, item_kv_start = {0, 0, 0}, item_kv_len = {37, 5, 5};
  std::vector<int32_t> item_reader_start = {0, 2, 3}, item_num_readers = {2, 1, 1}, item_partial_start = {0, 2, 3};
  std::vector<int32_t> row_partial_indptr = {0, 2, 4}, row_partial_indices = {0, 2, 1, 3}, merge_rows = {0, 1};

  std::mt19937 gen(0);
  std::normal_distribution<float> nd;
  std::vector<float> q(total_q * Hq * D), kc(pages * PS * Hk * D), vc(kc.size());
  for (auto* v : {&q, &kc, &vc})
    for (float& x : *v) x = nd(gen);
  std::vector<float> out(total_q * Hq * D, NAN), lse(total_q * Hq, NAN), pout(4 * Hq * D, NAN), plse(4 * Hq, NAN);

  TreeAttentionParams p{};
  p.q = q.data(); p.k_cache = kc.data(); p.v_cache = vc.data();
  p.out = out.data(); p.lse = lse.data(); p.partial_out = pout.data(); p.partial_lse = plse.data();
  p.node_page_indptr = indptr.data(); p.node_page_indices = indices.data();
  p.reader_row = reader_row.data(); p.reader_limit = reader_limit.data();
  p.item_node = item_node.data(); p.item_kv_start = item_kv_start.data(); p.item_kv_len = item_kv_len.data();
  p.item_reader_start = item_reader_start.data(); p.item_num_readers = item_num_readers.data();
  p.item_partial_start = item_partial_start.data(); p.row_partial_indptr = row_partial_indptr.data();
  p.q_stride_row = Hq * D; p.q_stride_head = D;
  p.k_stride_page = p.v_stride_page = PS * Hk * D;
  p.k_stride_slot = p.v_stride_slot = Hk * D;
  p.k_stride_head = p.v_stride_head = D;
  p.num_items = 3; p.num_qo_heads = Hq; p.num_kv_heads = Hk; p.head_dim = D; p.page_size = PS;
  p.max_chunk_tokens = 37; p.max_readers = 2; p.sm_scale = 1.0f / std::sqrt(float(D));
  p.dtype = DType::kFloat32;
  int64_t bytes = 0;
  p.kv_bytes_loaded = &bytes;
  cpu::tree_attention(p);
  MergeParams m{};
  m.partial_out = pout.data(); m.partial_lse = plse.data();
  m.row_partial_indptr = row_partial_indptr.data(); m.row_partial_indices = row_partial_indices.data();
  m.merge_rows = merge_rows.data(); m.out = out.data(); m.lse = lse.data();
  m.num_rows = 2; m.num_heads = Hq; m.head_dim = D; m.v_dtype = m.out_dtype = DType::kFloat32;
  cpu::merge_states(m);

  double worst = 0;
  const int vis[2][2] = {{0, 1}, {0, 2}};
  for (int r = 0; r < total_q; ++r)
    for (int h = 0; h < Hq; ++h) {
      const int kh = h / (Hq / Hk);
      std::vector<double> s, acc(D, 0.0);
      std::vector<int64_t> offs;
      for (int n : vis[r])
        for (int t = 0; t < node_len[n]; ++t)
          offs.push_back(cache_offset(indptr.data(), indices.data(), n, t, PS, kh, p.k_stride_page,
                                      p.k_stride_slot, p.k_stride_head));
      double mx = -INFINITY;
      for (int64_t o : offs) {
        double d = 0;
        for (int i = 0; i < D; ++i) d += double(q[(r * Hq + h) * D + i]) * kc[o + i];
        s.push_back(d * p.sm_scale);
        mx = std::max(mx, s.back());
      }
      double den = 0;
      for (size_t j = 0; j < offs.size(); ++j) {
        const double w = std::exp(s[j] - mx);
        den += w;
        for (int i = 0; i < D; ++i) acc[i] += w * vc[offs[j] + i];
      }
      for (int i = 0; i < D; ++i) worst = std::max(worst, std::fabs(acc[i] / den - out[(r * Hq + h) * D + i]));
      worst = std::max(worst, std::fabs(mx + std::log(den) - lse[r * Hq + h]));
    }
  const int64_t want = 2 * int64_t(37 + 5 + 5) * Hk * D * 4;
  std::printf("multiverse_cpu_smoke_test: max abs error %.3g, kv bytes %lld (unique %lld)\n", worst,
              static_cast<long long>(bytes), static_cast<long long>(want));
  return (worst < 1e-4 && bytes == want) ? 0 : 1;
}
