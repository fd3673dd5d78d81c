// CPU tree attention over a plan (docs/plan.md): one task per (work item, KV head).
//
// A task reads its chunk of one node's K/V from the cache ONCE for all packed rows (reader x GQA head)
// of the item. fp32 caches are read in place; fp16/bf16 rows are converted once into thread-local fp32
// scratch. Scores are computed transposed, S^T[t][m] (rows m in vector lanes): for a tile of TB tokens
// and one vector of rows, every d broadcasts TB key elements against one vector of pre-scaled queries,
// so K needs no transposition and the softmax (max, exp, sum over t) is vectorised across rows. Then
// O[m][:] = sum_t P^T[t][m] V[t][:] in register tiles of RB rows x VL dims. GCC/Clang vector
// extensions; the hot function is compiled for several ISAs (target_clones: x86-64-v4 / v3 / baseline)
// and picked at load time, so the binary is portable (no -march=native) and uses AVX-512 where present.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "multiverse/cpu_kernels.h"
#include "multiverse/index_math.h"
#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(MULTIVERSE_NO_CLONES)
#define MV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MV_CLONES
#endif
#define MV_INLINE inline __attribute__((always_inline))

namespace multiverse::cpu {
namespace {

constexpr int VL = 16;  // floats per vector (lowered to 1 zmm, 2 ymm or 4 xmm by the compiler)
constexpr int RB = 8;   // rows per register block
typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));  // unaligned access

MV_INLINE vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
MV_INLINE void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
MV_INLINE int round_up(int x, int m) { return (x + m - 1) / m * m; }

struct Scratch {
  std::vector<float> kb, vb, qt, st;
  std::vector<const float*> krow, vrow;
  std::vector<int32_t> vis, slot, head, row;  // row >= 0: write straight to out (single partial)
};

constexpr int TB = 8;  // tokens per register tile of S^T

// Row-vector helpers for NR lanes (16, or 8 for items with at most 8 packed rows).
template <int NR> struct RowVec;
template <> struct RowVec<16> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef float U __attribute__((vector_size(64), aligned(4)));
};
template <> struct RowVec<8> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef float U __attribute__((vector_size(32), aligned(4)));
};

// exp(x) for x <= 0 (scores minus their max), any vector width: 2^(x log2 e) split into 2^n * 2^f,
// f in [-1/2, 1/2], 2^f by its degree-6 Taylor polynomial (relative error < 2e-7), 2^n added into the
// exponent bits; x is clamped at -87 (callers select exact zeros for masked entries).
template <class V, class I>
MV_INLINE V vexp_rows(V x) {
  const V lo = V{} - 87.0f;
  x = x < lo ? lo : x;
  const V t = x * 1.44269504088896341f;
  const V n = (t + 12582912.0f) - 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  const V f = (t - n) * 0.693147180559945309f;
  V q = V{} + 1.0f / 720;
  q = q * f + 1.0f / 120;
  q = q * f + 1.0f / 24;
  q = q * f + 1.0f / 6;
  q = q * f + 0.5f;
  q = q * f + 1.0f;
  q = q * f + 1.0f;
  const I ni = __builtin_convertvector(n, I);
  return reinterpret_cast<V>(reinterpret_cast<I>(q) + (ni << 23));
}

// S^T, softmax and P V for one task whose rows are laid out in vectors of NR lanes.
template <class E, int NR>
MV_INLINE void compute_rows(const TreeAttentionParams& p, Scratch& sc, int M, int Mp, int max_vis,
                            const float* const* krow, const float* const* vrow, int r_begin, int r_end) {
  using T = typename E::T;
  using V = typename RowVec<NR>::V;
  using I = typename RowVec<NR>::I;
  using U = typename RowVec<NR>::U;
  const int D = p.head_dim;
  const float* __restrict qt = sc.qt.data();  // [D][Mp]
  float* __restrict st = sc.st.data();        // [Tp][Mp]
  const float ninf = -std::numeric_limits<float>::infinity();
  float lse[NR], inv[NR];
  for (int r0 = r_begin; r0 < r_end; r0 += NR) {
    I visv;
    int32_t tmax = 0;
    for (int i = 0; i < NR; ++i) {
      visv[i] = sc.vis[r0 + i];
      tmax = std::max(tmax, sc.vis[r0 + i]);
    }
    // S^T[t][r0:r0+NR] = sum_d K[t][d] * Qt[d][r0:r0+NR] for TB tokens at a time.
    for (int t0 = 0; t0 < tmax; t0 += TB) {
      V acc[TB];
      const float* kr[TB];
      for (int j = 0; j < TB; ++j) {
        acc[j] = V{};
        kr[j] = krow[std::min(t0 + j, max_vis - 1)];  // past the chunk: a valid row, masked below
      }
      const float* qd = qt + r0;
      for (int d = 0; d < D; ++d, qd += Mp) {
        const V qv = *reinterpret_cast<const U*>(qd);
        for (int j = 0; j < TB; ++j) acc[j] += kr[j][d] * qv;
      }
      for (int j = 0; j < TB && t0 + j < tmax; ++j)
        *reinterpret_cast<U*>(st + static_cast<size_t>(t0 + j) * Mp + r0) = acc[j];
    }
    // Softmax over t, vectorised across rows; invisible tokens (t >= vis) get weight exactly 0.
    // NaN policy (docs/errors.md, tests/test_nan_policy.py): a non-finite score a row sees (NaN/Inf
    // in its q or in a visible K token) marks the row `bad`: its out and lse become NaN below.
    V mv = V{} + ninf;
    I bad = I{};
    for (int t = 0; t < tmax; ++t) {
      const V x = *reinterpret_cast<const U*>(st + static_cast<size_t>(t) * Mp + r0);
      const I vis_t = (I{} + t) < visv;
      const V xm = vis_t ? x : V{} + ninf;
      mv = xm > mv ? xm : mv;
      bad |= vis_t & ((x - x) != V{});  // x - x is NaN exactly when x is NaN or +-Inf
    }
    const V mref = mv == ninf ? V{} : mv;  // rows that see nothing: any finite reference
    V sum = V{};
    for (int t = 0; t < tmax; ++t) {
      float* sp = st + static_cast<size_t>(t) * Mp + r0;
      const V x = *reinterpret_cast<const U*>(sp);
      const V e = (I{} + t) < visv ? vexp_rows<V, I>(x - mref) : V{};
      *reinterpret_cast<U*>(sp) = e;
      sum += e;
    }
    for (int i = 0; i < NR; ++i) {
      const bool seen = sum[i] > 0.0f;
      inv[i] = seen ? 1.0f / sum[i] : 0.0f;
      lse[i] = seen ? mv[i] + std::log(sum[i]) : ninf;
      if (bad[i]) inv[i] = lse[i] = std::numeric_limits<float>::quiet_NaN();  // NaN policy
    }
    // O[r][:] = sum_t P^T[t][r] V[t][:], RB rows x VL dims per register tile.
    for (int rb = r0; rb < r0 + NR && rb < M; rb += RB) {
      int32_t tb = 0, tmin = std::numeric_limits<int32_t>::max();
      for (int r = 0; r < RB; ++r) tb = std::max(tb, sc.vis[rb + r]);
      for (int r = 0; r < RB && rb + r < M; ++r) tmin = std::min(tmin, sc.vis[rb + r]);
      for (int d0 = 0; d0 < D; d0 += VL) {
        vf acc[RB];
        for (int r = 0; r < RB; ++r) acc[r] = vf{};
        const float* pt = st + rb;
        int t = 0;
        for (; t < tmin; ++t, pt += Mp) {  // tokens every row of the block sees
          const vf vv = vload(vrow[t] + d0);
          for (int r = 0; r < RB; ++r) acc[r] += pt[r] * vv;
        }
        // NaN policy: tokens only some rows see are skipped (not multiplied by 0) for the others, so
        // a NaN/Inf in V never leaks across the mask (0 * NaN = NaN).
        for (; t < tb; ++t, pt += Mp) {
          const vf vv = vload(vrow[t] + d0);
          for (int r = 0; r < RB; ++r)
            if (t < sc.vis[rb + r]) acc[r] += pt[r] * vv;
        }
        const int n = std::min(VL, D - d0);
        for (int r = 0; r < RB && rb + r < M; ++r) {
          const int m = rb + r;
          const vf o = acc[r] * inv[m - r0];
          if (sc.row[m] >= 0) {  // the row's only partial: final output in q's dtype
            T* dst = static_cast<T*>(p.out) + partial_out_offset(sc.row[m], sc.head[m], p.num_qo_heads, D) + d0;
            for (int i = 0; i < n; ++i) dst[i] = E::store(o[i]);
          } else {
            float* dst = p.partial_out + partial_out_offset(sc.slot[m], sc.head[m], p.num_qo_heads, D) + d0;
            for (int i = 0; i < n; ++i) dst[i] = o[i];
          }
        }
      }
    }
    for (int i = 0; i < NR && r0 + i < M; ++i) {
      const int m = r0 + i;
      if (sc.row[m] >= 0)
        p.lse[partial_lse_offset(sc.row[m], sc.head[m], p.num_qo_heads)] = lse[i];
      else
        p.partial_lse[partial_lse_offset(sc.slot[m], sc.head[m], p.num_qo_heads)] = lse[i];
    }
  }
}

// One (work item, kv head) task.
template <class E>
MV_CLONES void run_task(const TreeAttentionParams& p, int32_t item, int32_t kh, Scratch& sc) {
  using T = typename E::T;
  const int D = p.head_dim;
  const int Dp = round_up(D, VL);
  const int group = gqa_group(p.num_qo_heads, p.num_kv_heads);
  const int32_t node = p.item_node[item];
  const int32_t kv_start = p.item_kv_start[item];
  const int32_t len = p.item_kv_len[item];
  const int32_t nr = p.item_num_readers[item];
  const int32_t r0 = p.item_reader_start[item];
  const int32_t slot0 = p.item_partial_start[item];
  const int M = nr * group;
  if (M == 0) return;  // capacity padding item
  // Rows go in vectors of 16 lanes; a remainder of <= 8 rows takes one 8-lane vector (less padding,
  // e.g. 36 rows -> 40 instead of 48).
  const int full16 = M / 16 * 16;
  const int rem = M - full16;
  const int Mp = rem == 0 ? full16 : rem <= 8 ? full16 + 8 : full16 + 16;

  sc.vis.assign(Mp, 0);
  sc.slot.assign(Mp, -1);
  sc.head.assign(Mp, 0);
  sc.row.assign(Mp, -1);
  int32_t max_vis = 0;
  for (int m = 0; m < M; ++m) {
    const int32_t rd = r0 + packed_reader(m, group);
    sc.vis[m] = visible_in_chunk(p.reader_limit[rd], kv_start, len);
    sc.slot[m] = slot0 + packed_reader(m, group);
    sc.head[m] = packed_head(m, group, kh);
    const int32_t qrow = p.reader_row[rd];
    if (p.row_partial_indptr[qrow + 1] - p.row_partial_indptr[qrow] == 1) sc.row[m] = qrow;
    max_vis = std::max(max_vis, sc.vis[m]);
  }

  // The chunk's K/V rows (only tokens some reader sees), each read from the cache once: fp32 rows in
  // place when whole vectors fit (head_dim % VL == 0), otherwise converted into padded fp32 scratch.
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const bool in_place = std::is_same_v<E, F32> && D % VL == 0;
  sc.krow.resize(std::max(max_vis, 1));
  sc.vrow.resize(std::max(max_vis, 1));
  if (!in_place) {
    sc.kb.resize(static_cast<size_t>(std::max(max_vis, 1)) * Dp);
    sc.vb.resize(static_cast<size_t>(std::max(max_vis, 1)) * Dp);
  }
  // Pass 1: row addresses, and prefetches (into L2) of every row: rows of one head are a page/slot
  // stride apart, which hardware prefetchers do not follow, so the misses would otherwise stall the
  // loops one by one.
  for (int t = 0; t < max_vis; ++t) {
    const int32_t tok = kv_start + t;
    const T* kp = kc + cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                    p.k_stride_page, p.k_stride_slot, p.k_stride_head);
    const T* vp = vc + cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                    p.v_stride_page, p.v_stride_slot, p.v_stride_head);
    for (int b = 0; b < D; b += 64 / static_cast<int>(sizeof(T))) {
      __builtin_prefetch(kp + b, 0, 2);
      __builtin_prefetch(vp + b, 0, 2);
    }
    sc.krow[t] = reinterpret_cast<const float*>(kp);  // fp32 in place; else the raw row for pass 2
    sc.vrow[t] = reinterpret_cast<const float*>(vp);
  }
  // Pass 2 (fp16/bf16, or head_dim not a multiple of VL): convert each row once into fp32 scratch.
  if (!in_place) {
    for (int t = 0; t < max_vis; ++t) {
      const T* kp = reinterpret_cast<const T*>(sc.krow[t]);
      const T* vp = reinterpret_cast<const T*>(sc.vrow[t]);
      float* kd = sc.kb.data() + static_cast<size_t>(t) * Dp;
      float* vd = sc.vb.data() + static_cast<size_t>(t) * Dp;
      for (int d = 0; d < D; ++d) kd[d] = E::load(kp[d]);
      for (int d = 0; d < D; ++d) vd[d] = E::load(vp[d]);
      for (int d = D; d < Dp; ++d) kd[d] = vd[d] = 0.0f;
      sc.krow[t] = kd;
      sc.vrow[t] = vd;
    }
  }
  if (p.kv_bytes_loaded != nullptr && max_vis > 0)
    __atomic_fetch_add(p.kv_bytes_loaded, chunk_kv_bytes(max_vis, D, sizeof(T)), __ATOMIC_RELAXED);

  // Queries transposed [D][Mp], pre-scaled by sm_scale (so scores and lse include it); pad rows 0.
  sc.qt.assign(static_cast<size_t>(D) * Mp, 0.0f);
  const T* qp = static_cast<const T*>(p.q);
  for (int m = 0; m < M; ++m) {
    const int32_t row = p.reader_row[r0 + packed_reader(m, group)];
    const T* src = qp + row * p.q_stride_row + static_cast<int64_t>(sc.head[m]) * p.q_stride_head;
    for (int d = 0; d < D; ++d) sc.qt[static_cast<size_t>(d) * Mp + m] = E::load(src[d]) * p.sm_scale;
  }
  sc.st.resize(static_cast<size_t>(round_up(std::max(max_vis, 1), TB)) * Mp);
  if (max_vis == 0) {  // nothing visible in this chunk for any row: empty partials
    for (int m = 0; m < Mp; ++m) sc.vis[m] = 0;
  }
  const int mv1 = std::max(max_vis, 1);
  const int end16 = rem > 8 ? Mp : full16;
  if (end16 > 0) compute_rows<E, 16>(p, sc, M, Mp, mv1, sc.krow.data(), sc.vrow.data(), 0, end16);
  if (end16 < Mp) compute_rows<E, 8>(p, sc, M, Mp, mv1, sc.krow.data(), sc.vrow.data(), end16, Mp);
}

template <class E>
void run_all(const TreeAttentionParams& p) {
  const int64_t tasks = static_cast<int64_t>(p.num_items) * p.num_kv_heads;
  parallel_tasks<Scratch>(tasks, [&](int64_t t, Scratch& sc) {
    run_task<E>(p, static_cast<int32_t>(t / p.num_kv_heads), static_cast<int32_t>(t % p.num_kv_heads), sc);
  });
}

}  // namespace

void tree_attention(const TreeAttentionParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: run_all<F32>(p); break;
    case DType::kFloat16: run_all<F16>(p); break;
    case DType::kBFloat16: run_all<BF16>(p); break;
  }
}

}  // namespace multiverse::cpu
