// CPU backward of tree attention over the forward's plan (docs/api.md "Autograd"; the specification is
// multiverse_kernels/backends/reference/tree_attention_backward.py).
//
// FlashAttention-2 style: nothing of size rows x keys is kept; the scores are recomputed from the saved
// lse. One task per (work item, KV head) of the plan (readers of one chunk of one node's tokens), the
// chunk walked in sub-chunks of kSubChunk tokens (FlashAttention-2's KV blocks); per sub-chunk:
//   1. its K/V rows that some reader sees are loaded once (fp16/bf16 converted to fp32) as
//      K [t][d], K^T [d][t] and V^T [d][t];
//   2. the packed rows (reader x GQA head) that see at least one token of the sub-chunk (and whose lse is
//      finite) go in blocks of MB rows: S = (sm_scale q) K^T, P = exp(S - lse) (0 past the row's
//      visible tokens), dP = dO V^T, dS = P (dP - delta), then dV_sub += P^T dO,
//      dK_sub += dS^T (sm_scale q), dQ_block = sm_scale dS K;
//   3. dQ_block is added to dq row by row, and at the end dK/dV_sub to dk/dv token by token, each
//      under a striped spin lock (a row reads many chunks; a long node's readers can be split over
//      several items of the same chunk). The float32 accumulation order therefore depends on the
//      thread schedule: results are not bitwise reproducible run to run (within float32 rounding).
// delta = rowsum(dO * O) - grad_lse is computed once per (row, head) in a first parallel pass.
//
// All five products are one register-tiled kernel, C[i][j..j+VL) += sum_k A[i, k] * B[k][j..j+VL)
// (A read through two strides, so A^T costs nothing; B rows contiguous): RT rows x VL columns of
// accumulators, one B vector load and RT broadcasts per k. GCC/Clang vector extensions, compiled for
// several ISAs (target_clones: x86-64-v4 / v3 / baseline) and picked at load time.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "convert.h"
#include "multiverse/cpu_kernels.h"
#include "multiverse/index_math.h"
#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(MULTIVERSE_NO_CLONES)
#define MVB_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MVB_CLONES
#endif
#define MVB_INLINE inline __attribute__((always_inline))

namespace multiverse::cpu {
namespace {

constexpr int VL = 16;  // columns per register tile (padding unit of tokens and head dims)
constexpr int W = 8;    // floats per native vector: 1 ymm (AVX2 / AVX-512 clones) or 2 xmm (baseline)
constexpr int MB = 32;  // packed rows per block (S/dS blocks are MB x chunk tokens)
constexpr int RPAD = 4; // rows are padded to a multiple of this
constexpr int kSubChunk = 256;  // tokens per sub-chunk (K/V block): 2 x 256 x 128 x 4 B of K/V, in L2
// 32-byte vectors: wider GCC vector types are split into pieces that the compiler keeps on the stack.
typedef float v8 __attribute__((vector_size(W * 4)));
typedef float v8u __attribute__((vector_size(W * 4), aligned(4)));
typedef int32_t i8v __attribute__((vector_size(W * 4)));

MVB_INLINE v8 vload(const float* p) { return *reinterpret_cast<const v8u*>(p); }
MVB_INLINE void vstore(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
MVB_INLINE int round_up(int x, int m) { return (x + m - 1) / m * m; }

// exp(x) for x <= ~0: 2^(x log2 e) = 2^n * 2^f, f in [-1/2, 1/2], 2^f by its degree-6 Taylor polynomial
// (relative error < 2e-7); x clamped at -87 (callers select exact zeros for invisible entries).
MVB_INLINE v8 vexp(v8 x) {
  const v8 lo = v8{} - 87.0f;
  x = x < lo ? lo : x;
  const v8 t = x * 1.44269504088896341f;
  const v8 n = (t + 12582912.0f) - 12582912.0f;
  const v8 f = (t - n) * 0.693147180559945309f;
  v8 q = v8{} + 1.0f / 720;
  q = q * f + 1.0f / 120;
  q = q * f + 1.0f / 24;
  q = q * f + 1.0f / 6;
  q = q * f + 0.5f;
  q = q * f + 1.0f;
  q = q * f + 1.0f;
  const i8v ni = __builtin_convertvector(n, i8v);
  return reinterpret_cast<v8>(reinterpret_cast<i8v>(q) + (ni << 23));
}

// One register tile: C[i0 + r][j0 .. j0 + 16) (+)= sum_k A[i0 + r][k] * B[k][j0 .. j0 + 16), r < R; A
// row-major with row stride lda (kTransA = false) or given transposed, A[i][k] = At[k * lda + i].
template <int R, bool kTransA>
MVB_INLINE void tile(int K, const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                     float* __restrict C, int64_t ldc, bool accumulate) {
  v8 c[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = v8{};
  for (int k = 0; k < K; ++k) {
    const v8 b0 = vload(B + k * ldb), b1 = vload(B + k * ldb + W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float a = kTransA ? A[k * lda + r] : A[r * lda + k];
      c[r][0] += a * b0;
      c[r][1] += a * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = C + r * ldc;
    if (accumulate) {
      c[r][0] += vload(cr);
      c[r][1] += vload(cr + W);
    }
    vstore(cr, c[r][0]);
    vstore(cr + W, c[r][1]);
  }
}

// C[i][j] (+)= sum_{k < K} A[i][k] * B[k][j] for i < rows (a multiple of 2), j < cols (a multiple of
// VL): 6-row tiles (12 accumulators: 2 FMA ports x 4 cycles latency, plus headroom), 4/2-row tails.
template <bool kTransA>
MVB_INLINE void gemm(int rows, int cols, int K, const float* __restrict A, int64_t lda,
                     const float* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc, bool accumulate) {
  const int64_t ai = kTransA ? 1 : lda;  // step of A between rows
  for (int j0 = 0; j0 < cols; j0 += VL) {
    int i0 = 0;
    for (; i0 + 6 <= rows; i0 += 6)
      tile<6, kTransA>(K, A + i0 * ai, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, accumulate);
    for (; i0 + 4 <= rows; i0 += 4)
      tile<4, kTransA>(K, A + i0 * ai, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, accumulate);
    for (; i0 + 2 <= rows; i0 += 2)
      tile<2, kTransA>(K, A + i0 * ai, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, accumulate);
  }
}

// Striped spin locks (a lock guards every key hashing to it).
class Locks {
 public:
  explicit Locks(size_t n) : n_(n), a_(new std::atomic<int>[n]) {
    for (size_t i = 0; i < n; ++i) a_[i].store(0, std::memory_order_relaxed);
  }
  void lock(uint64_t key) {
    std::atomic<int>& x = a_[key % n_];
    int spins = 0;
    while (x.exchange(1, std::memory_order_acquire) != 0) {
      while (x.load(std::memory_order_relaxed) != 0) {
        if (++spins > 256) std::this_thread::yield();  // the holder may be descheduled
#if defined(__x86_64__)
        else __builtin_ia32_pause();
#endif
      }
    }
  }
  void unlock(uint64_t key) { a_[key % n_].store(0, std::memory_order_release); }

 private:
  size_t n_;
  std::unique_ptr<std::atomic<int>[]> a_;
};

struct Scratch {
  std::vector<float> k, kt, vt, dk, dv, q, dout, s, ds, dq;
  std::vector<int32_t> row, head, vis;  // active rows of the task
  std::vector<int32_t> sub, svis;  // of them, those that see the current sub-chunk; their tokens in it
  std::vector<float> lse, delta;
};

template <class E>
void compute_delta(const TreeAttentionBackwardParams& p) {
  using T = typename E::T;
  const int H = p.num_qo_heads, D = p.head_dim;
  parallel_for(p.total_q, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      for (int h = 0; h < H; ++h) {
        const T* o = static_cast<const T*>(p.out) + r * p.out_stride_row + h * p.out_stride_head;
        const T* g = static_cast<const T*>(p.grad_out) + r * p.go_stride_row + h * p.go_stride_head;
        float acc = 0.0f;
        for (int d = 0; d < D; ++d) acc += E::load(o[d]) * E::load(g[d]);
        const int64_t i = r * H + h;
        if (p.grad_lse != nullptr && std::isfinite(p.lse[i])) acc -= p.grad_lse[i];
        p.delta[i] = acc;
      }
    }
  });
}

// One sub-chunk (tokens [tok0, tok0 + max svis) of `node`) for the active rows sc.sub (visible tokens in
// it: sc.svis): load K/V, then blocks of MB rows, then add dK/dV into the outputs.
template <class E>
MVB_CLONES void run_subchunk(const TreeAttentionBackwardParams& p, int32_t node, int32_t tok0, int32_t kh,
                             Scratch& sc, Locks& row_locks, Locks& slot_locks) {
  using T = typename E::T;
  const int D = p.head_dim, H = p.num_qo_heads;
  const int Dp = round_up(D, VL);
  const int A = static_cast<int>(sc.sub.size());
  int32_t tmax = 0;
  for (int a = 0; a < A; ++a) tmax = std::max(tmax, sc.svis[a]);
  const int Tp = round_up(tmax, VL);

  // K [Tp][Dp], K^T [Dp][Tp], V^T [Dp][Tp] of the visible tokens, zero padded.
  sc.k.assign(static_cast<size_t>(Tp) * Dp, 0.0f);
  sc.kt.assign(static_cast<size_t>(Dp) * Tp, 0.0f);
  sc.vt.assign(static_cast<size_t>(Dp) * Tp, 0.0f);
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  for (int t = 0; t < tmax; ++t) {
    const int32_t tok = tok0 + t;
    const T* kp = kc + cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                    p.k_stride_page, p.k_stride_slot, p.k_stride_head);
    const T* vp = vc + cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                    p.v_stride_page, p.v_stride_slot, p.v_stride_head);
    float* kr = sc.k.data() + static_cast<size_t>(t) * Dp;
    for (int d = 0; d < D; ++d) {
      const float kx = E::load(kp[d]);
      kr[d] = kx;
      sc.kt[static_cast<size_t>(d) * Tp + t] = kx;
      sc.vt[static_cast<size_t>(d) * Tp + t] = E::load(vp[d]);
    }
  }
  sc.dk.assign(static_cast<size_t>(Tp) * Dp, 0.0f);
  sc.dv.assign(static_cast<size_t>(Tp) * Dp, 0.0f);
  sc.q.resize(static_cast<size_t>(MB) * Dp);
  sc.dout.resize(static_cast<size_t>(MB) * Dp);
  sc.s.resize(static_cast<size_t>(MB) * Tp);
  sc.ds.resize(static_cast<size_t>(MB) * Tp);
  sc.dq.resize(static_cast<size_t>(MB) * Dp);
  float* __restrict qb = sc.q.data();
  float* __restrict ob = sc.dout.data();
  float* __restrict sb = sc.s.data();
  float* __restrict dsb = sc.ds.data();
  float* __restrict dqb = sc.dq.data();
  const T* qsrc = static_cast<const T*>(p.q);
  const T* gsrc = static_cast<const T*>(p.grad_out);

  for (int b0 = 0; b0 < A; b0 += MB) {
    const int nb = std::min(MB, A - b0);
    const int nbp = round_up(nb, RPAD);
    int32_t bvis = 0;
    for (int i = 0; i < nb; ++i) bvis = std::max(bvis, sc.svis[b0 + i]);
    const int Tb = round_up(bvis, VL);
    // sm_scale q and dO of the block's rows (pad rows 0: they see nothing below).
    for (int i = 0; i < nbp; ++i) {
      float* qd = qb + static_cast<size_t>(i) * Dp;
      float* od = ob + static_cast<size_t>(i) * Dp;
      if (i < nb) {
        const int64_t row = sc.row[sc.sub[b0 + i]], head = sc.head[sc.sub[b0 + i]];
        const T* qs = qsrc + row * p.q_stride_row + head * p.q_stride_head;
        const T* gs = gsrc + row * p.go_stride_row + head * p.go_stride_head;
        for (int d = 0; d < D; ++d) qd[d] = E::load(qs[d]) * p.sm_scale;
        for (int d = 0; d < D; ++d) od[d] = E::load(gs[d]);
        for (int d = D; d < Dp; ++d) qd[d] = od[d] = 0.0f;
      } else {
        std::memset(qd, 0, sizeof(float) * Dp);
        std::memset(od, 0, sizeof(float) * Dp);
      }
    }
    // S = (sm_scale q) K^T and dP = dO V^T, [nbp][Tb] with row stride Tp.
    gemm<false>(nbp, Tb, D, qb, Dp, sc.kt.data(), Tp, sb, Tp, false);
    gemm<false>(nbp, Tb, D, ob, Dp, sc.vt.data(), Tp, dsb, Tp, false);
    // P = exp(S - lse) where visible (else 0); dS = P * (dP - delta).
    for (int i = 0; i < nbp; ++i) {
      float* sr = sb + static_cast<size_t>(i) * Tp;
      float* dr = dsb + static_cast<size_t>(i) * Tp;
      const int32_t vis = i < nb ? sc.svis[b0 + i] : 0;
      const float l = i < nb ? sc.lse[sc.sub[b0 + i]] : 0.0f;
      const float dl = i < nb ? sc.delta[sc.sub[b0 + i]] : 0.0f;
      for (int t0 = 0; t0 < Tb; t0 += W) {
        i8v idx;
        for (int j = 0; j < W; ++j) idx[j] = t0 + j;
        const v8 x = vload(sr + t0) - l;
        const v8 pv = idx < vis ? vexp(x) : v8{};
        vstore(sr + t0, pv);
        vstore(dr + t0, pv * (vload(dr + t0) - dl));
      }
    }
    // dV[t] += sum_i P[i][t] dO[i];  dK[t] += sum_i dS[i][t] (sm_scale q)[i];  dQ[i] = sum_t dS[i][t] K[t].
    gemm<true>(Tb, Dp, nbp, sb, Tp, ob, Dp, sc.dv.data(), Dp, true);
    gemm<true>(Tb, Dp, nbp, dsb, Tp, qb, Dp, sc.dk.data(), Dp, true);
    gemm<false>(nbp, Dp, Tb, dsb, Tp, sc.k.data(), Dp, dqb, Dp, false);
    for (int i = 0; i < nb; ++i) {
      const int64_t row = sc.row[sc.sub[b0 + i]], head = sc.head[sc.sub[b0 + i]];
      const uint64_t key = static_cast<uint64_t>(row) * p.num_kv_heads + kh;
      float* dst = p.dq + (row * H + head) * D;
      const float* src = dqb + static_cast<size_t>(i) * Dp;
      row_locks.lock(key);
      for (int d = 0; d < D; ++d) dst[d] += src[d] * p.sm_scale;
      row_locks.unlock(key);
    }
  }
  // dK/dV of the chunk into the (contiguous [num_pages, page_size, Hk, D]) float32 outputs.
  const int64_t sslot = static_cast<int64_t>(p.num_kv_heads) * D;
  const int64_t spage = sslot * p.page_size;
  for (int t = 0; t < tmax; ++t) {
    const int32_t tok = tok0 + t;
    const int32_t page = token_page(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size);
    const int64_t off = page * spage + (tok % p.page_size) * sslot + static_cast<int64_t>(kh) * D;
    const uint64_t key = (static_cast<uint64_t>(page) * p.page_size + tok % p.page_size) * p.num_kv_heads + kh;
    const float* ks = sc.dk.data() + static_cast<size_t>(t) * Dp;
    const float* vs = sc.dv.data() + static_cast<size_t>(t) * Dp;
    slot_locks.lock(key);
    for (int d = 0; d < D; ++d) p.dk[off + d] += ks[d];
    for (int d = 0; d < D; ++d) p.dv[off + d] += vs[d];
    slot_locks.unlock(key);
  }
}

template <class E>
MVB_CLONES void run_task(const TreeAttentionBackwardParams& p, int32_t item, int32_t kh, Scratch& sc,
                         Locks& row_locks, Locks& slot_locks) {
  const int H = p.num_qo_heads;
  const int group = gqa_group(p.num_qo_heads, p.num_kv_heads);
  const int32_t node = p.item_node[item];
  const int32_t kv_start = p.item_kv_start[item];
  const int32_t len = p.item_kv_len[item];
  const int32_t nr = p.item_num_readers[item];
  const int32_t rd0 = p.item_reader_start[item];
  const int M = nr * group;
  if (M == 0) return;  // capacity padding item

  // Active packed rows: those that see part of the chunk and saw something at all (finite lse).
  sc.row.clear();
  sc.head.clear();
  sc.vis.clear();
  sc.lse.clear();
  sc.delta.clear();
  int32_t tmax = 0;
  for (int m = 0; m < M; ++m) {
    const int32_t rd = rd0 + packed_reader(m, group);
    const int32_t vis = visible_in_chunk(p.reader_limit[rd], kv_start, len);
    if (vis == 0) continue;
    const int32_t row = p.reader_row[rd];
    const int32_t head = packed_head(m, group, kh);
    const float l = p.lse[static_cast<int64_t>(row) * H + head];
    if (!std::isfinite(l)) continue;
    sc.row.push_back(row);
    sc.head.push_back(head);
    sc.vis.push_back(vis);
    sc.lse.push_back(l);
    sc.delta.push_back(p.delta[static_cast<int64_t>(row) * H + head]);
    tmax = std::max(tmax, vis);
  }
  const int A = static_cast<int>(sc.row.size());
  if (A == 0) return;
  // The chunk in sub-chunks of kSubChunk tokens (FlashAttention-2's KV blocks): K, K^T, V^T, dK, dV and
  // the S/dS blocks of one sub-chunk stay in L2 however long the plan's chunk is (the forward's plan
  // may give a whole node to one item so that its rows write no partial states).
  for (int s0 = 0; s0 < tmax; s0 += kSubChunk) {
    // Rows that see part of this sub-chunk, with their visible tokens in it.
    sc.sub.clear();
    sc.svis.clear();
    for (int a = 0; a < A; ++a) {
      if (sc.vis[a] <= s0) continue;
      sc.sub.push_back(a);
      sc.svis.push_back(std::min(sc.vis[a] - s0, kSubChunk));
    }
    run_subchunk<E>(p, node, kv_start + s0, kh, sc, row_locks, slot_locks);
  }
}

template <class E>
void run_all(const TreeAttentionBackwardParams& p) {
  compute_delta<E>(p);
  Locks row_locks(4093), slot_locks(4093);
  const int64_t tasks = static_cast<int64_t>(p.num_items) * p.num_kv_heads;
  parallel_tasks<Scratch>(tasks, [&](int64_t t, Scratch& sc) {
    run_task<E>(p, static_cast<int32_t>(t / p.num_kv_heads), static_cast<int32_t>(t % p.num_kv_heads), sc,
                row_locks, slot_locks);
  });
}

}  // namespace

void tree_attention_backward(const TreeAttentionBackwardParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: run_all<F32>(p); break;
    case DType::kFloat16: run_all<F16>(p); break;
    case DType::kBFloat16: run_all<BF16>(p); break;
  }
}

}  // namespace multiverse::cpu
