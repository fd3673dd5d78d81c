// CPU tree attention over a plan (docs/plan.md): one task per (work item, KV head).
//
// A task loads its chunk of one node's K/V ONCE (converted to fp32 into thread-local scratch: K
// transposed to [D][T], V as [T][D]) and computes the partial softmax state of every packed row
// (reader x GQA head) of the item against it. The dot products are register-blocked RB rows x VL
// tokens (QK^T) and RB rows x VL dims (PV) with GCC/Clang vector extensions, so every K/V element
// loaded from cache feeds RB rows per FMA from L1/L2. The hot function is compiled for several ISAs
// (target_clones: x86-64-v4 / v3 / baseline) and picked at load time, so the binary is portable
// (no -march=native) and still uses AVX-512/AVX2 where present.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));  // unaligned access

MV_INLINE vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
MV_INLINE void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
MV_INLINE vf vsplat(float x) { return vf{} + x; }
MV_INLINE int round_up(int x, int m) { return (x + m - 1) / m * m; }

// exp(x) for x <= 0 (scores minus their max): 2^(x log2 e) split into 2^n * 2^f, f in [-1/2, 1/2],
// 2^f by its degree-6 Taylor polynomial (relative error < 2e-7), 2^n added into the exponent bits.
MV_INLINE vf vexp_nonpos(vf x) {
  const vf lo = vsplat(-87.0f);
  x = x < lo ? lo : x;
  const vf t = x * 1.44269504088896341f;
  const vf magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (t + magic) - magic;
  const vf f = (t - n) * 0.693147180559945309f;  // f * ln 2, |.| <= 0.347
  vf p = vsplat(1.0f / 720);
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const vi ni = __builtin_convertvector(n, vi);
  return reinterpret_cast<vf>(reinterpret_cast<vi>(p) + (ni << 23));
}

MV_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < VL; ++i) m = std::max(m, v[i]);
  return m;
}
MV_INLINE float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

struct Scratch {
  std::vector<float> kt, vb, qb, s;
  std::vector<int32_t> vis, slot, head, row;  // row >= 0: write straight to out (single partial)
};

// One (work item, kv head) task. Dp = head_dim rounded up to VL; Tp = chunk rounded up to VL.
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
  const int Mp = round_up(std::max(M, 1), RB);
  const int Tp = round_up(std::max(len, 1), VL);

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

  // Load the chunk once: only the tokens some reader sees (max_vis <= len).
  // Padding lanes are never read into a kept result, so no zeroing (resize value-initialises once).
  sc.kt.resize(static_cast<size_t>(Dp) * Tp);
  sc.vb.resize(static_cast<size_t>(Tp) * Dp);
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  // Load the chunk in groups of VL tokens: V rows are copied as they are; K is transposed group-wise
  // (for each d, the VL tokens' d-th elements form one contiguous VL-float store into kt), so the
  // transposed buffer is written a full cache line at a time while the VL source rows stay in L1.
  // Tokens past max_vis in the last group repeat the last visible token (never used: masked).
  float* __restrict ktp = sc.kt.data();
  for (int t0 = 0; t0 < max_vis; t0 += VL) {
    const T* krow[VL];
    for (int i = 0; i < VL; ++i) {
      const int32_t tok = kv_start + std::min(t0 + i, max_vis - 1);
      krow[i] = kc + cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                  p.k_stride_page, p.k_stride_slot, p.k_stride_head);
      if (t0 + i < max_vis) {
        const T* vp = vc + cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                        p.v_stride_page, p.v_stride_slot, p.v_stride_head);
        float* vrow = sc.vb.data() + static_cast<size_t>(t0 + i) * Dp;
        for (int d = 0; d < D; ++d) vrow[d] = E::load(vp[d]);
      }
    }
    for (int d = 0; d < D; ++d) {
      float* dst = ktp + static_cast<size_t>(d) * Tp + t0;
      for (int i = 0; i < VL; ++i) dst[i] = E::load(krow[i][d]);
    }
  }
  if (p.kv_bytes_loaded != nullptr && max_vis > 0)
    __atomic_fetch_add(p.kv_bytes_loaded, chunk_kv_bytes(max_vis, D, sizeof(T)), __ATOMIC_RELAXED);

  // Packed query rows, pre-scaled by sm_scale (so scores and lse include it).
  sc.qb.resize(static_cast<size_t>(Mp) * Dp);
  const T* qp = static_cast<const T*>(p.q);
  for (int m = 0; m < M; ++m) {
    const int32_t row = p.reader_row[r0 + packed_reader(m, group)];
    const T* src = qp + row * p.q_stride_row + static_cast<int64_t>(sc.head[m]) * p.q_stride_head;
    // Row blocks of RB rows stored d-major ([Mp / RB][Dp][RB]): the RB values the QK^T loop
    // broadcasts for one d are adjacent, addressed from one pointer.
    float* dst = sc.qb.data() + static_cast<size_t>(m / RB) * Dp * RB + m % RB;
    for (int d = 0; d < D; ++d) dst[static_cast<size_t>(d) * RB] = E::load(src[d]) * p.sm_scale;
  }

  sc.s.resize(static_cast<size_t>(RB) * Tp * 2);
  float* S = sc.s.data();                             // scores [RB][Tp]
  float* __restrict PT = S + static_cast<size_t>(RB) * Tp;  // probabilities transposed [Tp][RB]
  const float* kt = sc.kt.data();
  const float* vb = sc.vb.data();
  for (int mb = 0; mb < M; mb += RB) {
    int32_t tmax = 0;
    for (int r = 0; r < RB; ++r) tmax = std::max(tmax, sc.vis[mb + r]);
    const int Tb = round_up(std::max(tmax, 1), VL);
    const float* __restrict qblk = sc.qb.data() + static_cast<size_t>(mb) * Dp;  // [Dp][RB]
    // S[r][t] = q_r . k_t for an RB x VL tile at a time, accumulators in registers.
    for (int t0 = 0; t0 < Tb; t0 += VL) {
      vf acc[RB];
      for (int r = 0; r < RB; ++r) acc[r] = vf{};
      const float* __restrict kp = kt + t0;
      const float* __restrict qd = qblk;
      for (int d = 0; d < D; ++d, kp += Tp, qd += RB) {
        const vf kv = vload(kp);
        for (int r = 0; r < RB; ++r) acc[r] += qd[r] * kv;
      }
      for (int r = 0; r < RB; ++r) vstore(S + r * Tp + t0, acc[r]);
    }
    // Softmax numerators per row; invisible tokens get weight 0.
    float inv_den[RB], lse[RB];
    for (int r = 0; r < RB; ++r) {
      float* sr = S + r * Tp;
      const int32_t vis = sc.vis[mb + r];
      if (vis == 0) {
        std::fill(sr, sr + Tb, 0.0f);
        inv_den[r] = 0.0f;
        lse[r] = -std::numeric_limits<float>::infinity();
        continue;
      }
      for (int t = vis; t < Tb; ++t) sr[t] = -std::numeric_limits<float>::infinity();
      vf mv = vsplat(-std::numeric_limits<float>::infinity());
      for (int t0 = 0; t0 < Tb; t0 += VL) {
        const vf x = vload(sr + t0);
        mv = x > mv ? x : mv;
      }
      const float mx = hmax(mv);
      for (int t0 = 0; t0 < Tb; t0 += VL) vstore(sr + t0, vexp_nonpos(vload(sr + t0) - mx));
      for (int t = vis; t < Tb; ++t) sr[t] = 0.0f;  // exp clamps at -87: zero the masked tail exactly
      vf sv = vf{};
      for (int t0 = 0; t0 < Tb; t0 += VL) sv += vload(sr + t0);
      const float den = hsum(sv);
      inv_den[r] = 1.0f / den;
      lse[r] = mx + std::log(den);
    }
    for (int t = 0; t < tmax; ++t)
      for (int r = 0; r < RB; ++r) PT[t * RB + r] = S[r * Tp + t];
    // O[r][:] = sum_t P[r][t] V[t][:], RB rows x VL dims per register tile.
    for (int d0 = 0; d0 < Dp; d0 += VL) {
      vf acc[RB];
      for (int r = 0; r < RB; ++r) acc[r] = vf{};
      const float* __restrict vp = vb + d0;
      const float* __restrict pt = PT;
      for (int t = 0; t < tmax; ++t, vp += Dp, pt += RB) {
        const vf vv = vload(vp);
        for (int r = 0; r < RB; ++r) acc[r] += pt[r] * vv;
      }
      for (int r = 0; r < RB; ++r) {
        const int m = mb + r;
        if (m >= M) break;
        const vf o = acc[r] * inv_den[r];
        const int n = std::min(VL, D - d0);
        if (sc.row[m] >= 0) {  // the row's only partial: final output in q's dtype
          T* dst = static_cast<T*>(p.out) + partial_out_offset(sc.row[m], sc.head[m], p.num_qo_heads, D) + d0;
          for (int i = 0; i < n; ++i) dst[i] = E::store(o[i]);
        } else {
          float* dst = p.partial_out + partial_out_offset(sc.slot[m], sc.head[m], p.num_qo_heads, D) + d0;
          for (int i = 0; i < n; ++i) dst[i] = o[i];
        }
      }
    }
    for (int r = 0; r < RB && mb + r < M; ++r) {
      const int m = mb + r;
      if (sc.row[m] >= 0)
        p.lse[partial_lse_offset(sc.row[m], sc.head[m], p.num_qo_heads)] = lse[r];
      else
        p.partial_lse[partial_lse_offset(sc.slot[m], sc.head[m], p.num_qo_heads)] = lse[r];
    }
  }
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
