// KERNEL (backward): the CPU tree-attention backward kernels, compiled once per ISA. A per-ISA kernel
// unit (kernels_*.cpp, through kernels_isa_unit.h) includes this after its target
// pragma, with MV_LEVEL defined and simd.h (the shared SIMD helpers) included. The driver is
// tree_attention_backward.cpp (delta pass, threads, scratch, locks), which calls delta_rows and task
// through the ISA table (isa_dispatch.cpp). Everything here has internal linkage and uses no std
// containers (see isa_kernels.h). The specification is
// multiverse_kernels/backends/reference/tree_attention_backward.py (docs/api.md "Autograd").
//
// FlashAttention-2 style: nothing of size rows x keys is kept; the scores are recomputed from the saved
// lse. One task per (work item, KV head) of the plan (readers of one chunk of one node's tokens), the
// chunk walked in sub-chunks of kBwdSubChunk tokens (FlashAttention-2's KV blocks); per sub-chunk:
//   1. its K/V rows that some reader sees are loaded once (fp16/bf16 converted to fp32) as
//      K [t][d], K^T [d][t] and V^T [d][t];
//   2. the packed rows (reader x GQA head) that see at least one token of the sub-chunk (and whose lse is
//      finite) go in blocks of kBwdRowBlock rows: S = (sm_scale q) K^T, P = exp(S - lse) (0 past the
//      row's visible tokens), dP = dO V^T, dS = P (dP - delta), then dV_sub += P^T dO,
//      dK_sub += dS^T (sm_scale q), dQ_block = sm_scale dS K;
//   3. dQ_block is added to dq row by row, and at the end dK/dV_sub to dk/dv token by token, each
//      under a striped spin lock (a row reads many chunks; a long node's readers can be split over
//      several items of the same chunk). The float32 accumulation order therefore depends on the
//      thread schedule: results are not bitwise reproducible run to run (within float32 rounding).
// delta = rowsum(dO * O) - grad_lse is computed once per (row, head) in a first parallel pass.
//
// All five products are one register-tiled kernel, C[i][j..j+kBwdPad) += sum_k A[i, k] * B[k][j..)
// (A read through two strides, so A^T costs nothing; B rows contiguous): RT rows x kBwdPad columns of
// accumulators (BV-float vectors), one B vector load per vector and RT broadcasts per k.
//
// bf16 dot products (MV_LEVEL 3, AVX512-BF16; kBwdDot<E>: bf16 inputs): the five products by
// vdpbf16ps (gemm2: two k per instruction, exact bf16 products, fp32 sums), as FlashAttention-2 does on
// tensor cores: q, dO, K, V enter as their bf16 values (unscaled q: sm_scale multiplies S instead), P
// and dS are rounded to bf16 (round to nearest even) for dV += P^T dO, dK += (sm_scale dS)^T q and
// dQ = dS K; S, P, dP, dS, delta and every accumulator stay fp32. Operands are stored as 32-bit pairs
// along the reduced dimension: K^T and V^T as [D/2][T] (a row's adjacent head dims), K as [T/2][D]
// (token pairs), q and dO as [rows][D/2] (row-major, as they are) and [rows/2][D] (row pairs), P and
// sm_scale dS as [rows/2][T] (row pairs), dS as [rows][T/2] (token pairs).
//
// AMX (MV_LEVEL 4, amx.h): the same five products and layouts on tdpbf16ps tiles (gemm_amx; the two
// products whose A is given transposed - P^T and (sm_scale dS)^T as row pairs - transpose each 16-row
// slice into a local tile first); the rows of a block are then padded to 16.
#pragma once

#ifndef MV_LEVEL
#error "define MV_LEVEL before including tree_attention_bwd_impl.h (see kernels_isa_unit.h)"
#endif

namespace multiverse::cpu {
namespace {
namespace bwd {

constexpr int VL = kBwdPad;      // columns per register tile (padding unit of tokens and head dims)
constexpr int BV = 8;            // floats per tile vector: 1 ymm (AVX2 / AVX-512) or 2 xmm (baseline)
constexpr int NV = VL / BV;      // vectors per tile row
constexpr int MB = kBwdRowBlock; // packed rows per block (S/dS blocks are MB x sub-chunk tokens)
constexpr int RPAD = 4;          // rows are padded to a multiple of this
using V = VT<BV>::V;
using I = VT<BV>::I;

MV_INL int round_up(int x, int m) { return (x + m - 1) / m * m; }

// One register tile: C[i0 + r][j0 .. j0 + VL) (+)= sum_k A[i0 + r][k] * B[k][j0 .. j0 + VL), r < R; A
// row-major with row stride lda (kTransA = false) or given transposed, A[i][k] = At[k * lda + i].
template <int R, bool kTransA>
MV_INL void tile(int K, const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                 float* __restrict C, int64_t ldc, bool accumulate) {
  V c[R][NV];
  MV_UNROLL(8) for (int r = 0; r < R; ++r)
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) c[r][v] = V{};
  for (int k = 0; k < K; ++k) {
    V b[NV];
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) b[v] = vld<BV>(B + k * ldb + v * BV);
    MV_UNROLL(8) for (int r = 0; r < R; ++r) {
      const V a = vbcast<V>(kTransA ? A[k * lda + r] : A[r * lda + k]);
      MV_UNROLL(2) for (int v = 0; v < NV; ++v) c[r][v] = vfma(a, b[v], c[r][v]);
    }
  }
  MV_UNROLL(8) for (int r = 0; r < R; ++r) {
    float* cr = C + r * ldc;
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) {
      if (accumulate) c[r][v] += vld<BV>(cr + v * BV);
      vst<BV>(cr + v * BV, c[r][v]);
    }
  }
}

// C[i][j] (+)= sum_{k < K} A[i][k] * B[k][j] for i < rows (a multiple of 2), j < cols (a multiple of
// VL): 6-row tiles (12 accumulators: 2 FMA ports x 4 cycles latency, plus headroom), 4/2-row tails.
template <bool kTransA>
MV_INL void gemm(int rows, int cols, int K, const float* __restrict A, int64_t lda, const float* __restrict B,
                 int64_t ldb, float* __restrict C, int64_t ldc, bool accumulate) {
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

#if MV_LEVEL >= 3
template <class E> inline constexpr bool kBwdDot = std::is_same_v<E, BF16>;

// gemm's register tile for bf16 pairs: C[i0 + r][j0 .. j0 + 16) (+)= sum_k dot2(A[i0 + r][k], B[k][j0 ..)),
// each element a 32-bit pair of bf16 (vdpbf16ps: both halves multiplied and added to the fp32 lane).
template <int R, bool kTransA>
MV_INL void tile2(int K2, const uint32_t* __restrict A, int64_t lda, const uint32_t* __restrict B, int64_t ldb,
                  float* __restrict C, int64_t ldc, bool accumulate) {
  __m512 c[R];
  MV_UNROLL(8) for (int r = 0; r < R; ++r) c[r] = _mm512_setzero_ps();
  for (int k = 0; k < K2; ++k) {
    const __m512i b = _mm512_loadu_si512(B + k * ldb);
    MV_UNROLL(8) for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(kTransA ? A[k * lda + r] : A[r * lda + k]));
      c[r] = _mm512_dpbf16_ps(c[r], (__m512bh)a, (__m512bh)b);
    }
  }
  MV_UNROLL(8) for (int r = 0; r < R; ++r) {
    float* cr = C + r * ldc;
    if (accumulate) c[r] = _mm512_add_ps(c[r], _mm512_loadu_ps(cr));
    _mm512_storeu_ps(cr, c[r]);
  }
}

// gemm over pairs: K2 pairs of the reduced dimension; rows a multiple of 2, cols of 16.
template <bool kTransA>
MV_INL void gemm2(int rows, int cols, int K2, const uint32_t* __restrict A, int64_t lda,
                  const uint32_t* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc, bool accumulate) {
  const int64_t ai = kTransA ? 1 : lda;
  for (int j0 = 0; j0 < cols; j0 += 16) {
    int i0 = 0;
    for (; i0 + 8 <= rows; i0 += 8)
      tile2<8, kTransA>(K2, A + i0 * ai, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, accumulate);
    for (; i0 + 4 <= rows; i0 += 4)
      tile2<4, kTransA>(K2, A + i0 * ai, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, accumulate);
    for (; i0 + 2 <= rows; i0 += 2)
      tile2<2, kTransA>(K2, A + i0 * ai, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, accumulate);
  }
}

// dst[j] = (bf16(scale r0[j]), bf16(scale r1[j])) for j < n (n % 16 == 0). dst may be r0 (each block of
// 16 is loaded from both rows before it is stored).
MV_INL void pair_rows_bf16(const float* r0, const float* r1, float scale, uint32_t* dst, int n) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int j = 0; j < n; j += 16) {
    const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(r0 + j), sv)));
    const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(r1 + j), sv)));
    _mm512_storeu_si512(dst + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

// A bf16 row of D elements as D2 = Dp / 2 pairs (zero past D).
MV_INL void row_pairs(const uint16_t* src, int D, int Dp, uint32_t* dst) {
  for (int e = 0; e < Dp / 2; ++e) {
    const uint32_t lo = 2 * e < D ? src[2 * e] : 0, hi = 2 * e + 1 < D ? src[2 * e + 1] : 0;
    dst[e] = lo | hi << 16;
  }
}
#else
template <class E> inline constexpr bool kBwdDot = false;
#endif

#if MV_LEVEL >= 4
// AMX (amx.h) for the bf16 products: C[i][j] (+)= sum_k dot2(A[i][k], B[k][j]) for i < rows (a multiple
// of 16), j < cols (of 16), k < K2 pairs (of 8), one C tile of 16 x 16 at a time: per 16 pairs a full A
// tile (tile 2: 16 rows x 16 pairs) and B tile (3: 16 pair rows x 16 columns), an 8-pair rest on the
// half tiles (5: 16 x 8 pairs, 6: 8 pair rows). A row-major (lda pairs apart), or kTransA: given as A^T
// (A[i][k] = At[k * lda + i]; K2 <= 16), each 16-row slice transposed once into a local tile.
template <bool kTransA>
MV_INL void gemm_amx(int rows, int cols, int K2, const uint32_t* __restrict A, int64_t lda,
                     const uint32_t* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc, bool accumulate) {
  static_assert(kBwdPad % 16 == 0 && kBwdRowBlock % 16 == 0, "AMX tiles of 16 rows / columns");
  const size_t sa = static_cast<size_t>(lda) * 4, sb = static_cast<size_t>(ldb) * 4, scs = static_cast<size_t>(ldc) * 4;
  alignas(64) uint32_t at[16][16];  // kTransA: A[i0 .. i0 + 16)[0 .. 16) (pairs 0-7 also the half tile's)
  alignas(64) uint32_t at8[16][8];
  for (int i0 = 0; i0 < rows; i0 += 16) {
    if constexpr (kTransA) {
      const int kf = K2 / 16 * 16;
      for (int k = 0; k < kf; ++k)
        for (int i = 0; i < 16; ++i) at[i][k] = A[static_cast<size_t>(k) * lda + i0 + i];
      for (int k = kf; k < K2; ++k)
        for (int i = 0; i < 16; ++i) at8[i][k - kf] = A[static_cast<size_t>(k) * lda + i0 + i];
    }
    for (int j0 = 0; j0 < cols; j0 += 16) {
      float* c = C + static_cast<size_t>(i0) * ldc + j0;
      if (accumulate)
        MV_TILE_LOAD(0, c, scs);
      else
        MV_TILE_ZERO(0);
      int k = 0;
      for (; k + 16 <= K2; k += 16) {
        if constexpr (kTransA)
          MV_TILE_LOAD(2, at, sizeof(at[0]));
        else
          MV_TILE_LOAD(2, A + static_cast<size_t>(i0) * lda + k, sa);
        MV_TILE_LOAD(3, B + static_cast<size_t>(k) * ldb + j0, sb);
        MV_TILE_DPBF16(0, 2, 3);
      }
      if (k < K2) {  // 8 pairs
        if constexpr (kTransA)
          MV_TILE_LOAD(5, at8, sizeof(at8[0]));
        else
          MV_TILE_LOAD(5, A + static_cast<size_t>(i0) * lda + k, sa);
        MV_TILE_LOAD(6, B + static_cast<size_t>(k) * ldb + j0, sb);
        MV_TILE_DPBF16(0, 5, 6);
      }
      MV_TILE_STORE(0, c, scs);
    }
  }
}

// The bf16 products: on AMX tiles (MV_LEVEL 4) or by vdpbf16ps (gemm2).
template <bool kTransA>
MV_INL void gemm_bf16(int rows, int cols, int K2, const uint32_t* __restrict A, int64_t lda,
                      const uint32_t* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc, bool accumulate) {
  gemm_amx<kTransA>(rows, cols, K2, A, lda, B, ldb, C, ldc, accumulate);
}
#elif MV_LEVEL >= 3
template <bool kTransA>
MV_INL void gemm_bf16(int rows, int cols, int K2, const uint32_t* __restrict A, int64_t lda,
                      const uint32_t* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc, bool accumulate) {
  gemm2<kTransA>(rows, cols, K2, A, lda, B, ldb, C, ldc, accumulate);
}
#endif
// Rows of a block are padded to a multiple of this (AMX: whole 16-row tiles).
constexpr int kRowPad = MV_LEVEL >= 4 ? 16 : RPAD;

template <class E>
void delta_rows_t(const TreeAttentionBackwardParams& p, int64_t b, int64_t e) {
  using T = typename E::T;
  const int H = p.num_qo_heads, D = p.head_dim;
  for (int64_t r = b; r < e; ++r) {
    for (int h = 0; h < H; ++h) {
      const T* o = static_cast<const T*>(p.out) + r * p.out_stride_row + h * p.out_stride_head;
      const T* g = static_cast<const T*>(p.grad_out) + r * p.go_stride_row + h * p.go_stride_head;
      float acc = 0.0f;
      for (int d = 0; d < D; ++d) acc += E::load(o[d]) * E::load(g[d]);
      const int64_t i = r * H + h;
      if (p.grad_lse != nullptr && __builtin_isfinite(p.lse[i])) acc -= p.grad_lse[i];
      p.delta[i] = acc;
    }
  }
}

// One sub-chunk (tokens [tok0, tok0 + max svis) of `node`) for the A active rows sc.sub (visible tokens
// in it: sc.svis): load K/V, then blocks of MB rows, then add dK/dV into the outputs.
template <class E>
void run_subchunk(const TreeAttentionBackwardParams& p, int32_t node, int32_t tok0, int32_t kh, int A,
                  const BwdScratch& sc, const SpinLocks& row_locks, const SpinLocks& slot_locks) {
  using T = typename E::T;
  const int D = p.head_dim, H = p.num_qo_heads;
  const int Dp = round_up(D, VL);
  int32_t tmax = 0;
  for (int a = 0; a < A; ++a) tmax = imax(tmax, sc.svis[a]);
  const int Tp = round_up(tmax, VL);

  // K [Tp][Dp], K^T [Dp][Tp], V^T [Dp][Tp] of the visible tokens, zero padded.
  std::memset(sc.k, 0, sizeof(float) * Tp * Dp);
  std::memset(sc.kt, 0, sizeof(float) * Tp * Dp);
  std::memset(sc.vt, 0, sizeof(float) * Tp * Dp);
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  // (kBwdDot: K^T and V^T as [Dp/2][Tp] pairs in kt / vt, K as [Tp/2][Dp] token pairs in k.)
#if MV_LEVEL >= 3
  uint32_t* const kt2 = reinterpret_cast<uint32_t*>(sc.kt);
  uint32_t* const vt2 = reinterpret_cast<uint32_t*>(sc.vt);
  uint32_t* const k2 = reinterpret_cast<uint32_t*>(sc.k);
  const T* kprev = nullptr;  // kBwdDot: the K row of the even token before t
#endif
  for (int t = 0; t < tmax; ++t) {
    const int32_t tok = tok0 + t;
    const T* kp = kc + cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                    p.k_stride_page, p.k_stride_slot, p.k_stride_head);
    const T* vp = vc + cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                    p.v_stride_page, p.v_stride_slot, p.v_stride_head);
#if MV_LEVEL >= 3
    if constexpr (kBwdDot<E>) {
      uint32_t* kr2 = reinterpret_cast<uint32_t*>(sc.vrow);  // one row's pairs, then transposed
      row_pairs(kp, D, Dp, kr2);
      for (int e = 0; e < Dp / 2; ++e) kt2[static_cast<size_t>(e) * Tp + t] = kr2[e];
      row_pairs(vp, D, Dp, kr2);
      for (int e = 0; e < Dp / 2; ++e) vt2[static_cast<size_t>(e) * Tp + t] = kr2[e];
      if (t & 1) {
        fwd::pack_pair_row(kprev, kp, k2 + static_cast<size_t>(t / 2) * Dp, D, Dp);
      } else {
        kprev = kp;
        if (t + 1 == tmax) fwd::pack_pair_row(kp, nullptr, k2 + static_cast<size_t>(t / 2) * Dp, D, Dp);
      }
      continue;
    }
#endif
    float* kr = sc.k + static_cast<size_t>(t) * Dp;
    pack_row<E>(kp, kr, D, Dp);
    pack_row<E>(vp, sc.vrow, D, Dp);
    for (int d = 0; d < D; ++d) {
      sc.kt[static_cast<size_t>(d) * Tp + t] = kr[d];
      sc.vt[static_cast<size_t>(d) * Tp + t] = sc.vrow[d];
    }
  }
  std::memset(sc.dk, 0, sizeof(float) * Tp * Dp);
  std::memset(sc.dv, 0, sizeof(float) * Tp * Dp);
  float* __restrict qb = sc.q;
  float* __restrict ob = sc.dout;
  float* __restrict sb = sc.s;
  float* __restrict dsb = sc.ds;
  float* __restrict dqb = sc.dq;
  const T* qsrc = static_cast<const T*>(p.q);
  const T* gsrc = static_cast<const T*>(p.grad_out);

  for (int b0 = 0; b0 < A; b0 += MB) {
    const int nb = imin(MB, A - b0);
    const int nbp = round_up(nb, kBwdDot<E> ? kRowPad : RPAD);
    int32_t bvis = 0;
    for (int i = 0; i < nb; ++i) bvis = imax(bvis, sc.svis[b0 + i]);
    const int Tb = round_up(bvis, VL);
    // sm_scale q and dO of the block's rows (pad rows 0: they see nothing below).
    // (kBwdDot: q and dO as [nbp][Dp/2] pairs, unscaled, then as [nbp/2][Dp] row pairs after them.)
#if MV_LEVEL >= 3
    uint32_t* const q2 = reinterpret_cast<uint32_t*>(qb);
    uint32_t* const o2 = reinterpret_cast<uint32_t*>(ob);
    uint32_t* const qv2 = q2 + static_cast<size_t>(MB) * Dp / 2;
    uint32_t* const ov2 = o2 + static_cast<size_t>(MB) * Dp / 2;
    if constexpr (kBwdDot<E>) {
      for (int i = 0; i < nbp; i += 2) {
        const T* qr[2] = {nullptr, nullptr};
        const T* gr[2] = {nullptr, nullptr};
        for (int u = 0; u < 2; ++u) {
          if (i + u >= nb) {
            for (int e = 0; e < Dp / 2; ++e) q2[(i + u) * Dp / 2 + e] = o2[(i + u) * Dp / 2 + e] = 0;
            continue;
          }
          const int64_t row = sc.row[sc.sub[b0 + i + u]], head = sc.head[sc.sub[b0 + i + u]];
          qr[u] = qsrc + row * p.q_stride_row + head * p.q_stride_head;
          gr[u] = gsrc + row * p.go_stride_row + head * p.go_stride_head;
          row_pairs(qr[u], D, Dp, q2 + static_cast<size_t>(i + u) * Dp / 2);
          row_pairs(gr[u], D, Dp, o2 + static_cast<size_t>(i + u) * Dp / 2);
        }
        uint32_t* qd = qv2 + static_cast<size_t>(i / 2) * Dp;
        uint32_t* od = ov2 + static_cast<size_t>(i / 2) * Dp;
        if (qr[0] == nullptr) {
          for (int d = 0; d < Dp; ++d) qd[d] = od[d] = 0;
        } else {
          fwd::pack_pair_row(qr[0], qr[1], qd, D, Dp);
          fwd::pack_pair_row(gr[0], gr[1], od, D, Dp);
        }
      }
    }
#endif
    for (int i = 0; !kBwdDot<E> && i < nbp; ++i) {
      float* qd = qb + static_cast<size_t>(i) * Dp;
      float* od = ob + static_cast<size_t>(i) * Dp;
      if (i < nb) {
        const int64_t row = sc.row[sc.sub[b0 + i]], head = sc.head[sc.sub[b0 + i]];
        pack_row<E>(qsrc + row * p.q_stride_row + head * p.q_stride_head, qd, D, Dp);
        pack_row<E>(gsrc + row * p.go_stride_row + head * p.go_stride_head, od, D, Dp);
        for (int d = 0; d < D; ++d) qd[d] *= p.sm_scale;
      } else {
        std::memset(qd, 0, sizeof(float) * Dp);
        std::memset(od, 0, sizeof(float) * Dp);
      }
    }
    // S = (sm_scale q) K^T and dP = dO V^T, [nbp][Tb] with row stride Tp.
    float sscale = 1.0f;  // what S is multiplied by (sm_scale when q entered unscaled)
#if MV_LEVEL >= 3
    if constexpr (kBwdDot<E>) {
      gemm_bf16<false>(nbp, Tb, Dp / 2, q2, Dp / 2, kt2, Tp, sb, Tp, false);
      gemm_bf16<false>(nbp, Tb, Dp / 2, o2, Dp / 2, vt2, Tp, dsb, Tp, false);
      sscale = p.sm_scale;
    } else
#endif
    {
      gemm<false>(nbp, Tb, D, qb, Dp, sc.kt, Tp, sb, Tp, false);
      gemm<false>(nbp, Tb, D, ob, Dp, sc.vt, Tp, dsb, Tp, false);
    }
    const V ssv = vbcast<V>(sscale);
    // P = exp(S - lse) where visible (else 0); dS = P * (dP - delta).
    I iota;
    for (int j = 0; j < BV; ++j) iota[j] = j;
    // Window: visible tokens lo <= t < vis. Soft-cap: s = cap tanh(s0 / cap), P = exp(s - lse) and
    // dS0 = dS * ds/ds0 = P (dP - delta) (1 - tanh^2).
    const float cap = p.softcap;
    const V capv = vbcast<V>(cap), inv_cap = vbcast<V>(cap > 0.0f ? 1.0f / cap : 0.0f);
    for (int i = 0; i < nbp; ++i) {
      float* sr = sb + static_cast<size_t>(i) * Tp;
      float* dr = dsb + static_cast<size_t>(i) * Tp;
      const int32_t vis = i < nb ? sc.svis[b0 + i] : 0;
      const int32_t lo = i < nb ? sc.slo[b0 + i] : 0;
      const float l = i < nb ? sc.lse[sc.sub[b0 + i]] : 0.0f;
      const float dl = i < nb ? sc.delta[sc.sub[b0 + i]] : 0.0f;
      if (cap > 0.0f) {
        for (int t0 = 0; t0 < Tb; t0 += BV) {
          const V th = vtanh<V, I>(vld<BV>(sr + t0) * ssv * inv_cap);
          const I seen = ((iota + t0) < vis) & ((iota + t0) >= lo);
          const V pv = seen ? vexp<V, I>(capv * th - l) : V{};
          vst<BV>(sr + t0, pv);
          vst<BV>(dr + t0, pv * (vld<BV>(dr + t0) - dl) * (V{} + 1.0f - th * th));
        }
        continue;
      }
      for (int t0 = 0; t0 < Tb; t0 += BV) {
        const V x = vld<BV>(sr + t0) * ssv - l;
        const V pv = ((iota + t0) < vis) & ((iota + t0) >= lo) ? vexp<V, I>(x) : V{};
        vst<BV>(sr + t0, pv);
        vst<BV>(dr + t0, pv * (vld<BV>(dr + t0) - dl));
      }
    }
    // dV[t] += sum_i P[i][t] dO[i];  dK[t] += sum_i dS[i][t] (sm_scale q)[i];  dQ[i] = sum_t dS[i][t] K[t].
#if MV_LEVEL >= 3
    if constexpr (kBwdDot<E>) {
      // bf16 operands: P as row pairs in place (row e of pairs overwrites P rows already read), dS as
      // token pairs (its bf16 rows) in the free second half of sb, sm_scale dS as row pairs in place.
      uint32_t* const p2 = reinterpret_cast<uint32_t*>(sb);
      uint32_t* const ds2t = p2 + static_cast<size_t>(nbp / 2) * Tp;
      uint32_t* const ds2r = reinterpret_cast<uint32_t*>(dsb);
      for (int e = 0; e < nbp / 2; ++e)
        pair_rows_bf16(sb + static_cast<size_t>(2 * e) * Tp, sb + static_cast<size_t>(2 * e + 1) * Tp, 1.0f,
                       p2 + static_cast<size_t>(e) * Tp, Tb);
      for (int i = 0; i < nbp; ++i) {
        const float* dr = dsb + static_cast<size_t>(i) * Tp;
        uint16_t* dst = reinterpret_cast<uint16_t*>(ds2t + static_cast<size_t>(i) * (Tp / 2));
        for (int j = 0; j < Tb; j += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(dr + j)));
      }
      for (int e = 0; e < nbp / 2; ++e)
        pair_rows_bf16(dsb + static_cast<size_t>(2 * e) * Tp, dsb + static_cast<size_t>(2 * e + 1) * Tp, p.sm_scale,
                       ds2r + static_cast<size_t>(e) * Tp, Tb);
      gemm_bf16<true>(Tb, Dp, nbp / 2, p2, Tp, ov2, Dp, sc.dv, Dp, true);
      gemm_bf16<true>(Tb, Dp, nbp / 2, ds2r, Tp, qv2, Dp, sc.dk, Dp, true);
      gemm_bf16<false>(nbp, Dp, Tb / 2, ds2t, Tp / 2, k2, Dp, dqb, Dp, false);
    } else
#endif
    {
      gemm<true>(Tb, Dp, nbp, sb, Tp, ob, Dp, sc.dv, Dp, true);
      gemm<true>(Tb, Dp, nbp, dsb, Tp, qb, Dp, sc.dk, Dp, true);
      gemm<false>(nbp, Dp, Tb, dsb, Tp, sc.k, Dp, dqb, Dp, false);
    }
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
    const float* ks = sc.dk + static_cast<size_t>(t) * Dp;
    const float* vs = sc.dv + static_cast<size_t>(t) * Dp;
    slot_locks.lock(key);
    for (int d = 0; d < D; ++d) p.dk[off + d] += ks[d];
    for (int d = 0; d < D; ++d) p.dv[off + d] += vs[d];
    slot_locks.unlock(key);
  }
}

template <class E>
void run_task(const TreeAttentionBackwardParams& p, int32_t item, int32_t kh, const BwdScratch& sc,
              const SpinLocks& row_locks, const SpinLocks& slot_locks) {
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
  int A = 0;
  int32_t tmax = 0, tmin = len;
  for (int m = 0; m < M; ++m) {
    const int32_t rd = rd0 + packed_reader(m, group);
    const int32_t vis = visible_in_chunk(p.reader_limit[rd], kv_start, len);
    const int32_t lo = window_lo_in_chunk(p.reader_lo, rd, kv_start);
    if (vis <= lo) continue;
    const int32_t row = p.reader_row[rd];
    const int32_t head = packed_head(m, group, kh);
    const float l = p.lse[static_cast<int64_t>(row) * H + head];
    if (!__builtin_isfinite(l)) continue;
    sc.row[A] = row;
    sc.head[A] = head;
    sc.vis[A] = vis;
    sc.lo[A] = lo;
    tmin = imin(tmin, lo);
    sc.lse[A] = l;
    sc.delta[A] = p.delta[static_cast<int64_t>(row) * H + head];
    ++A;
    tmax = imax(tmax, vis);
  }
  if (A == 0) return;
#if MV_LEVEL >= 4
  amx::TileConfig saved_tiles;  // bf16: the products on AMX tiles (the thread's configuration restored below)
  if constexpr (kBwdDot<E>) amx::configure(&saved_tiles);
#endif
  // The chunk in sub-chunks of kBwdSubChunk tokens (FlashAttention-2's KV blocks): K, K^T, V^T, dK, dV
  // and the S/dS blocks of one sub-chunk stay in L2 however long the plan's chunk is (the forward's plan
  // may give a whole node to one item so that its rows write no partial states).
  // (A sliding window starts at the first token some active row sees.)
  for (int s0 = tmin; s0 < tmax; s0 += kBwdSubChunk) {
    // Rows that see part of this sub-chunk, with their visible tokens in it.
    int n = 0;
    for (int a = 0; a < A; ++a) {
      if (sc.vis[a] <= s0 || sc.lo[a] >= s0 + kBwdSubChunk) continue;
      sc.sub[n] = a;
      sc.svis[n] = imin(sc.vis[a] - s0, kBwdSubChunk);
      sc.slo[n] = imax(sc.lo[a] - s0, 0);
      ++n;
    }
    if (n == 0) continue;
    run_subchunk<E>(p, node, kv_start + s0, kh, n, sc, row_locks, slot_locks);
  }
#if MV_LEVEL >= 4
  if constexpr (kBwdDot<E>) amx::restore(saved_tiles);
#endif
}

// ---------------------------------------------------------------------------------- entry points
// isa_kernels.h BwdDeltaFn / BwdTaskFn, any dtype.
void delta_rows(const TreeAttentionBackwardParams& p, int64_t b, int64_t e) {
  switch (p.dtype) {
    case DType::kFloat32: delta_rows_t<F32>(p, b, e); break;
    case DType::kFloat16: delta_rows_t<F16>(p, b, e); break;
    case DType::kBFloat16: delta_rows_t<BF16>(p, b, e); break;
    default: break;  // fp8 caches: forward only (the binding refuses them)
  }
}

void task(const TreeAttentionBackwardParams& p, int32_t item, int32_t kh, const BwdScratch& s,
          const SpinLocks& row_locks, const SpinLocks& slot_locks) {
  switch (p.dtype) {
    case DType::kFloat32: run_task<F32>(p, item, kh, s, row_locks, slot_locks); break;
    case DType::kFloat16: run_task<F16>(p, item, kh, s, row_locks, slot_locks); break;
    case DType::kBFloat16: run_task<BF16>(p, item, kh, s, row_locks, slot_locks); break;
    default: break;  // fp8 caches: forward only (the binding refuses them)
  }
}

}  // namespace bwd
}  // namespace
}  // namespace multiverse::cpu
