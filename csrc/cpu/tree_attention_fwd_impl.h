// KERNEL (forward): the CPU tree-attention forward micro-kernels, compiled once per ISA. A per-ISA
// kernel unit (kernels_*.cpp, through kernels_isa_unit.h) includes this after its
// target pragma, with MV_LEVEL defined and simd.h (the shared SIMD helpers) included. The driver is
// tree_attention.cpp (threads, scratch), which calls fwd_task through the ISA table (isa_dispatch.cpp).
// Everything here has internal linkage and uses no std containers (see isa_kernels.h).
//
// One task = (work item, kv head) of the plan (docs/plan.md): M packed rows (reader x GQA head) over a
// chunk of T tokens of one node. In GEMM terms, per block of up to kRowBlock rows:
//   S^T[T x M] = K[T x D] Q^T[D x M]   rows m in vector lanes: a register tile of TB tokens x (NV vectors
//                                      of rows) broadcasts TB key elements against NV query vectors per d
//   P^T = exp(S^T - max_t) (masked)    vectorised across rows, exact zeros for invisible tokens
//   O[M x D] = P[M x T] V[T x D]       d in vector lanes: a register tile of RB rows x (NV vectors of d)
//                                      broadcasts RB probabilities against NV value vectors per token
// Tile sizes fit the register file: AVX2 (16 ymm) uses 6 x 16 tiles (12 accumulators), AVX-512
// (32 zmm) 12 x 32 (24 accumulators). The chunk's K/V rows are read from the paged cache exactly once,
// in token blocks of kTokenBlock (kLightTokenBlock for tasks with few rows): converted (fp16 with
// F16C/AVX-512 vcvtph2ps, bf16 by a 16-bit shift, fp8 by the bit rebuild of simd.h fp8_to_f32_vec
// times the task's KV-head scale) or copied to packed fp32 scratch while the next block is prefetched,
// except fp32 V rows, which the P V tiles read in place (run_task; on AVX2 and AVX-512 a light task -
// at most kLightRows rows, caches in q's dtype, D a multiple of W - reads all of its fp32 / fp16 / bf16
// K and V rows in place, run_heads with qk_rows_direct and vld_elem, in fp32 FMAs even where bf16 dot
// products exist: few rows give the dot tiles little to do, and reading in place beats the packed copy);
// the byte counter is incremented per block where its rows are taken (the caches' element size: 1 byte
// per fp8 element).
//
// Element types: run_task<EQ, EKV> reads q and writes out as EQ (fp32 / fp16 / bf16) and reads the
// caches as EKV (EQ itself, or fp8 e4m3 / e5m2 with fp16 / bf16 q: TreeAttentionParams::kv_dtype).
//
// bf16 dot products (MV_LEVEL 3, AVX512-BF16; kDotBf16<EQ, EKV>: bf16 q and caches; not light tasks,
// above): S^T = K Q^T by
// vdpbf16ps, which multiplies the two bf16 halves of each 32-bit lane pairwise and adds both products to
// the fp32 lane - two head dims per instruction, the products exact (8-bit x 8-bit mantissas fit fp32's
// 24), the sums fp32 as on the other paths. Q^T is then stored as 32-bit pairs (q[2e], q[2e+1]) of the
// unscaled bf16 q (sm_scale multiplies the scores instead), and the chunk's K rows are copied as bf16
// (no conversion) into the same scratch rows. P V too: V is stored as token pairs (row t even holds
// (V[t][d], V[t + 1][d]) per d), P^T of the block is rounded to bf16 pairs (vcvtneps2bf16) and
// pv_tile_bf16 takes two tokens per instruction where every row of the tile sees both; tokens some row
// cannot see (causal edges, window starts) are taken one at a time in fp32 from the pairs and skipped
// for that row, as in pv_tile (NaN policy). l, the softmax denominator, stays the fp32 sum.
//
// AMX (MV_LEVEL 4, amx.h; tasks of >= 32 rows, D % 32 == 0): the same layouts feed tdpbf16ps tiles -
// qk_tile_amx for the scores of row tiles of 32 rows, pv_amx for P V over the tokens every row of the
// row block sees (pv_tile_bf16 takes the rest); row blocks are padded to 16 rows.
#pragma once

#ifndef MV_LEVEL
#error "define MV_LEVEL before including tree_attention_fwd_impl.h (see kernels_isa_unit.h)"
#endif

namespace multiverse::cpu {
namespace {
namespace fwd {

// Register tiles by ISA (W: floats per native vector, simd.h).
#if MV_LEVEL >= 2
constexpr int G = 8;      // row-lane granularity: rows are padded to a multiple of G (ymm remainders)
constexpr int QK_TB = 12; // tokens per S^T register tile of 2 x W rows (24 accumulators)
constexpr int PV_RB = 12; // rows per O register tile of 2 x W dims (24 accumulators)
#elif MV_LEVEL == 1
constexpr int G = 8;
constexpr int QK_TB = 6;  // 6 tokens x 16 rows: 12 ymm accumulators + 2 query vectors + 1 broadcast
constexpr int PV_RB = 6;  // 6 rows x 16 dims
#else
constexpr int G = 4;
constexpr int QK_TB = 6;
constexpr int PV_RB = 6;
#endif
constexpr int QK_TB_SMALL = 12;  // tokens per tile of one G-lane vector of rows (12 accumulators)
constexpr int kLightRows = 16;        // tasks with at most this many packed rows ...
constexpr int kLightTokenBlock = 24;  // ... load this many tokens per block (see run_task)
static_assert(kTokenBlock % QK_TB == 0 && kTokenBlock % QK_TB_SMALL == 0, "token block vs tiles");
static_assert(kLightTokenBlock % QK_TB == 0 && kLightTokenBlock % QK_TB_SMALL == 0 &&
              kLightTokenBlock <= kTokenBlock, "light token block vs tiles");
static_assert(kRowBlock % (2 * W) == 0 && kDimPad % W == 0, "row block / dim pad vs vector width");

struct TaskCtx {
  const TreeAttentionParams* p;
  int32_t node, kv_start, kh;
  int D, dp;
  float* kb;  // [tp][dp]
  float* vb;  // [tp][dp]
  float ks, vs;  // fp8 caches: the KV head's dequantization scales (1 otherwise, unused)
  // The row lookup's per-task constants (bind_rows; index_math.h paged_offset): the node's page list,
  // page_shift(page_size) (-1 unless a power of two: a division per row), the head's element offsets.
  const int32_t* pages = nullptr;
  int ps_shift = -1;
  int64_t k_head = 0, v_head = 0;
};

// Fill the row lookup's constants of c (after node / kh are set).
MV_INL void bind_rows(TaskCtx& c) {
  const TreeAttentionParams& p = *c.p;
  c.pages = p.node_page_indices + p.node_page_indptr[c.node];
  c.ps_shift = page_shift(p.page_size);
  c.k_head = static_cast<int64_t>(c.kh) * p.k_stride_head;
  c.v_head = static_cast<int64_t>(c.kh) * p.v_stride_head;
}

template <class E> MV_INL const typename E::T* k_row(const TaskCtx& c, int t) {
  const TreeAttentionParams& p = *c.p;
  return static_cast<const typename E::T*>(p.k_cache) +
         paged_offset(c.pages, c.kv_start + t, p.page_size, c.ps_shift, p.k_stride_page, p.k_stride_slot, c.k_head);
}
template <class E> MV_INL const typename E::T* v_row(const TaskCtx& c, int t) {
  const TreeAttentionParams& p = *c.p;
  return static_cast<const typename E::T*>(p.v_cache) +
         paged_offset(c.pages, c.kv_start + t, p.page_size, c.ps_shift, p.v_stride_page, p.v_stride_slot, c.v_head);
}

// Prefetches (into L2) of the next token block's K/V rows, spread over the current block's compute a
// few rows at a time: rows of one head are a page/slot stride apart, which hardware prefetchers do not
// follow across 4 KiB pages, and a burst of hundreds of prefetches would stall on the miss buffers.
template <class E> struct Prefetcher {
  const TaskCtx* c;
  int next, end;
  MV_INL void row(int t) const {
    const int bytes = c->D * static_cast<int>(sizeof(typename E::T));
    const char* kp = reinterpret_cast<const char*>(k_row<E>(*c, t));
    const char* vp = reinterpret_cast<const char*>(v_row<E>(*c, t));
    for (int o = 0; o < bytes; o += 64) {
      __builtin_prefetch(kp + o, 0, 2);
      __builtin_prefetch(vp + o, 0, 2);
    }
  }
  MV_INL void step(int n) {
    for (; n > 0 && next < end; --n) row(next++);
  }
  MV_INL void finish() { step(end - next); }
};

// This task's next-block prefetches first, then (when those are done) the next task's chunk, so that a
// compute-bound task hides the loads of a memory-bound one (the dispatcher pairs them).
template <class E> struct Prefetch2 {
  Prefetcher<E> own, next;
  MV_INL void step(int n) {
    const int left = own.end - own.next;
    own.step(n);
    if (n > left) next.step(n - left);
  }
};

#if MV_LEVEL >= 3
// Two bf16 rows -> dp 32-bit pairs (r0[d] low half, r1[d] high half; r1 nullptr: zeros), zeros past D.
MV_INL void pack_pair_row(const uint16_t* __restrict r0, const uint16_t* __restrict r1, uint32_t* __restrict dst,
                          int D, int dp) {
  int d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + d)));
    const __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + d)))
                          : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
  for (; d < D; ++d) dst[d] = static_cast<uint32_t>(r0[d]) | (r1 ? static_cast<uint32_t>(r1[d]) << 16 : 0u);
  for (; d < dp; ++d) dst[d] = 0;
}
#endif

#if MV_LEVEL >= 3
// n bf16 elements src -> dst (64-byte vectors, a masked tail).
MV_INL void copy_bf16_row(const uint16_t* __restrict src, uint16_t* __restrict dst, int n) {
  int d = 0;
  for (; d + 32 <= n; d += 32) _mm512_storeu_si512(dst + d, _mm512_loadu_si512(src + d));
  if (d < n) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (n - d)) - 1);
    _mm512_mask_storeu_epi16(dst + d, m, _mm512_maskz_loadu_epi16(m, src + d));
  }
}
#endif

// Load tokens [a, b) of the chunk from the caches into packed fp32 K/V: the task's only cache reads
// (fp8 rows dequantized here, times c.ks / c.vs). With v_direct (fp32) only K is copied, and
// vrows[t - a] points at token t's V row in the cache (read there by P V). Returns the bytes read.
// DOT (bf16 dot products): K rows are copied as bf16 into the start of their scratch rows (zero at D
// when D is odd: the tiles read head dims in pairs), V rows packed in token pairs (a is even).
template <class E, bool DOT = false>
inline int64_t pack_rows(const TaskCtx& c, int a, int b, bool v_direct, const float** vrows) {
  for (int t = a; t < b; ++t) {
    if constexpr (DOT) {
      uint16_t* dst = reinterpret_cast<uint16_t*>(c.kb + static_cast<size_t>(t) * c.dp);
#if MV_LEVEL >= 3
      copy_bf16_row(k_row<E>(c, t), dst, c.D);  // inline (a libc call per row costs more than the copy)
#else
      __builtin_memcpy(dst, k_row<E>(c, t), static_cast<size_t>(c.D) * sizeof(uint16_t));
#endif
      if (c.D & 1) dst[c.D] = 0;
    } else {
      pack_row<E>(k_row<E>(c, t), c.kb + static_cast<size_t>(t) * c.dp, c.D, c.dp, c.ks);
    }
#if MV_LEVEL >= 3
    if constexpr (DOT) {  // V as token pairs: at row t (even) the dp pairs (V[t][d], V[t + 1][d])
      if ((t - a) & 1) continue;
      pack_pair_row(v_row<E>(c, t), t + 1 < b ? v_row<E>(c, t + 1) : nullptr,
                    reinterpret_cast<uint32_t*>(c.vb + static_cast<size_t>(t) * c.dp), c.D, c.dp);
      continue;
    }
#endif
    if constexpr (std::is_same_v<E, F32>) {
      if (v_direct) {
        vrows[t - a] = v_row<E>(c, t);
        continue;
      }
    }
    pack_row<E>(v_row<E>(c, t), c.vb + static_cast<size_t>(t) * c.dp, c.D, c.dp, c.vs);
  }
  return b > a ? 2 * static_cast<int64_t>(b - a) * c.D * static_cast<int64_t>(sizeof(typename E::T)) : 0;
}

// ---------------------------------------------------------------------------------- S^T = K Q^T
// S^T[j][0 : NV*N] = sum_d K[j][d] * Qt[d][0 : NV*N] for j < TB (k: packed rows, stride dp).
template <int N, int NV, int TB>
MV_INL void qk_tile(const float* __restrict k, int dp, const float* __restrict q, int ldq, int D,
                    float* __restrict s, int lds) {
  using V = typename VT<N>::V;
  V acc[TB][NV];
  MV_UNROLL(24) for (int j = 0; j < TB; ++j)
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) acc[j][v] = V{};
  for (int d = 0; d < D; ++d) {
    V qv[NV];
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) qv[v] = vld<N>(q + static_cast<size_t>(d) * ldq + v * N);
    MV_UNROLL(24) for (int j = 0; j < TB; ++j) {
      const V kv = vbcast<V>(k[static_cast<size_t>(j) * dp + d]);
      MV_UNROLL(2) for (int v = 0; v < NV; ++v) acc[j][v] = vfma(kv, qv[v], acc[j][v]);
    }
  }
  MV_UNROLL(24) for (int j = 0; j < TB; ++j)
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) vst<N>(s + static_cast<size_t>(j) * lds + v * N, acc[j][v]);
}

// W elements of a cache row of E -> W floats, exact (fp16 by vcvtph2ps, bf16 by a 16-bit shift; not on
// the baseline ISA): rows read in place, by the P V tiles (fp32 V) and by light tasks (run_heads).
template <class E> MV_INL typename VT<W>::V vld_elem(const typename E::T* src) {
  using V = typename VT<W>::V;
  if constexpr (std::is_same_v<E, F32>) {
    return vld<W>(src);
  } else {
#if MV_LEVEL >= 2
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    if constexpr (std::is_same_v<E, F16>) {
      return (V)_mm512_cvtph_ps(h);
    } else {
      static_assert(std::is_same_v<E, BF16>, "fp16 / bf16 elements");
      return (V)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
#elif MV_LEVEL == 1
    return (V)cvt8_ps<E>(src);  // (simd.h)
#else
    static_assert(std::is_same_v<E, F32>, "16-bit rows are read in place on AVX2 / AVX-512 only");
#endif
  }
}

#if MV_LEVEL >= 1
// Light tasks (run_heads): S^T[t - t0][0 : R4] for tokens [t0, t1) with head dims in vector lanes, from
// each token's K row kr[t - t0] of E (D % W == 0; converted in registers, vld_elem): the cache's own
// row - no packed copy of K, whose store waits on the strided load - and every lane busy where the
// row-lane tile would use 4 of its lanes for a GQA group of 4. qr: [R4][ld] the rows' scaled queries
// (rows past M zero), R4 a multiple of 4. Per 2 tokens x 4 rows: 8 accumulators of W partial sums over
// d (AVX-512: each first folded to 8 by adding its 256-bit halves), reduced by a tree of horizontal adds
// into one vector [t][r0..r3], [t + 1][r0..r3] (a different summation order than the row-lane tiles:
// both are fp32 sums over d, compared against the reference by the tests).
MV_INL __m256 hsum8x(const __m256 a[8]) {  // lane i = the sum of a[i]'s lanes
  const __m256 h0 = _mm256_hadd_ps(a[0], a[1]), h1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h2 = _mm256_hadd_ps(a[4], a[5]), h3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h01 = _mm256_hadd_ps(h0, h1), h23 = _mm256_hadd_ps(h2, h3);  // 128-bit halves: lo / hi sums
  return _mm256_add_ps(_mm256_permute2f128_ps(h01, h23, 0x20), _mm256_permute2f128_ps(h01, h23, 0x31));
}

// W partial sums -> 8 (AVX-512: low 256-bit half + high half).
MV_INL __m256 fold8(typename VT<W>::V x) {
#if MV_LEVEL >= 2
  return _mm256_add_ps(_mm512_castps512_ps256((__m512)x), _mm512_extractf32x8_ps((__m512)x, 1));
#else
  return (__m256)x;
#endif
}

template <class E>
MV_INL void qk_rows_direct(const typename E::T* const* __restrict kr, const float* __restrict qr, int ld, int R4,
                           int D, int t0, int t1, float* __restrict st, int lds) {
  using V = typename VT<W>::V;
  for (int t = t0; t < t1; t += 2) {
    const typename E::T* k0 = kr[t - t0];
    const typename E::T* k1 = t + 1 < t1 ? kr[t + 1 - t0] : k0;  // an odd last token: twice, stored once
    for (int r0 = 0; r0 < R4; r0 += 4) {
      const float* q = qr + static_cast<size_t>(r0) * ld;
      V acc[8];
      MV_UNROLL(8) for (int i = 0; i < 8; ++i) acc[i] = V{};
      for (int d = 0; d < D; d += W) {
        const V a = vld_elem<E>(k0 + d), b = vld_elem<E>(k1 + d);
        MV_UNROLL(4) for (int r = 0; r < 4; ++r) {
          const V qv = vld<W>(q + static_cast<size_t>(r) * ld + d);
          acc[r] = vfma(a, qv, acc[r]);
          acc[4 + r] = vfma(b, qv, acc[4 + r]);
        }
      }
      __m256 h[8];
      MV_UNROLL(8) for (int i = 0; i < 8; ++i) h[i] = fold8(acc[i]);
      const __m256 s = hsum8x(h);
      float* sp = st + static_cast<size_t>(t - t0) * lds + r0;
      _mm_storeu_ps(sp, _mm256_castps256_ps128(s));
      if (t + 1 < t1) _mm_storeu_ps(sp + lds, _mm256_extractf128_ps(s, 1));
    }
  }
}
#endif

#if MV_LEVEL >= 3
template <class EQ, class EKV>
inline constexpr bool kDotBf16 = std::is_same_v<EQ, BF16> && std::is_same_v<EKV, BF16>;

// acc + a.lo * b.lo + a.hi * b.hi per 32-bit lane (bf16 halves; vdpbf16ps: exact products, fp32 sums).
template <int N>
MV_INL typename VT<N>::V dot2_bf16(typename VT<N>::V acc, typename VT<N>::UI a, typename VT<N>::UI b) {
  using V = typename VT<N>::V;
  if constexpr (N == 16) {
    return (V)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
  } else {
    static_assert(N == 8, "bf16 dot products on 16 or 8 lanes");
    return (V)_mm256_dpbf16_ps((__m256)acc, (__m256bh)a, (__m256bh)b);
  }
}

// S^T[j][0 : NV*N] = scale * sum_e dot2(K[j][2e : 2e + 2], Q2[e][0 : NV*N]) for j < TB, e < E2 (head-dim
// pairs). k: bf16 rows, ldk elements apart, zero at D when D is odd; q2: [E2][ldq] pairs (low half
// q[row][2e], high half q[row][2e + 1]). Each step broadcasts one token's pair against NV vectors of rows.
template <int N, int NV, int TB>
MV_INL void qk_tile_bf16(const uint16_t* __restrict k, int ldk, const uint32_t* __restrict q2, int ldq, int E2,
                         float* __restrict s, int lds, float scale) {
  using V = typename VT<N>::V;
  using UI = typename VT<N>::UI;
  V acc[TB][NV];
  MV_UNROLL(24) for (int j = 0; j < TB; ++j)
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) acc[j][v] = V{};
  for (int e = 0; e < E2; ++e) {
    UI qv[NV];
    MV_UNROLL(2) for (int v = 0; v < NV; ++v)
      __builtin_memcpy(&qv[v], q2 + static_cast<size_t>(e) * ldq + v * N, sizeof(UI));
    MV_UNROLL(24) for (int j = 0; j < TB; ++j) {
      uint32_t pair;
      __builtin_memcpy(&pair, k + static_cast<size_t>(j) * ldk + 2 * e, sizeof(pair));
      const UI kv = UI{} + pair;
      MV_UNROLL(2) for (int v = 0; v < NV; ++v) acc[j][v] = dot2_bf16<N>(acc[j][v], kv, qv[v]);
    }
  }
  const V sv = vbcast<V>(scale);
  MV_UNROLL(24) for (int j = 0; j < TB; ++j)
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) vst<N>(s + static_cast<size_t>(j) * lds + v * N, acc[j][v] * sv);
}
#else
template <class EQ, class EKV> inline constexpr bool kDotBf16 = false;
#endif

#if MV_LEVEL >= 4
// AMX (amx.h): S^T[0:16][0:32] = scale * K Q^T for 16 tokens x 32 rows, D % 32 == 0. Per 32 head dims
// one A tile (16 K rows of 32 bf16, ldk elements apart: the dot path's bf16 K rows) times two B tiles
// (16 head-dim pairs x 16 rows of q2, ldq pairs apart: the dot path's Q^T pairs) accumulates into two
// C tiles, which are S^T's layout (token rows, query-row columns) and are stored as such, then scaled.
static_assert(kTokenBlock % 16 == 0, "AMX score tiles take 16 tokens of a token block");
MV_INL void qk_tile_amx(const uint16_t* __restrict k, int ldk, const uint32_t* __restrict q2, int ldq, int D,
                        float* __restrict s, int lds, float scale) {
  const size_t a_stride = static_cast<size_t>(ldk) * sizeof(uint16_t);
  const size_t b_stride = static_cast<size_t>(ldq) * sizeof(uint32_t);
  MV_TILE_ZERO(0);
  MV_TILE_ZERO(1);
  for (int d0 = 0; d0 < D; d0 += 32) {
    const uint32_t* b = q2 + static_cast<size_t>(d0 / 2) * ldq;
    MV_TILE_LOAD(2, k + d0, a_stride);
    MV_TILE_LOAD(3, b, b_stride);
    MV_TILE_LOAD(4, b + 16, b_stride);
    MV_TILE_DPBF16(0, 2, 3);
    MV_TILE_DPBF16(1, 2, 4);
  }
  const size_t s_stride = static_cast<size_t>(lds) * sizeof(float);
  MV_TILE_STORE(0, s, s_stride);
  MV_TILE_STORE(1, s + 16, s_stride);
  using V = typename VT<16>::V;
  const V sv = vbcast<V>(scale);
  MV_UNROLL(16) for (int j = 0; j < 16; ++j) {
    float* row = s + static_cast<size_t>(j) * lds;
    vst<16>(row, vld<16>(row) * sv);
    vst<16>(row + 16, vld<16>(row + 16) * sv);
  }
}
#endif

// ---------------------------------------------------------------------------------- online softmax
// Columns c0 .. c0+N (rows of the row block), tokens [t0, t_end) of one token block, S^T rows stored
// from t0 (st row 0 = token t0). Per row: new max over its visible tokens of the block, the rescale
// alpha = exp(old max - new max) of its output and sum so far, P^T = exp(S^T - new max) for t < vis and
// exactly 0 for vis <= t < t_end (so P V tiles can run every row to their tile's max).
// LO: rows see only tokens t >= lo[row] too (sliding window; P^T exactly 0 below). CAP: soft-capped
// scores, s = cap * tanh(s / cap) (written back to S^T; the NaN policy looks at the raw score).
template <int N, bool LO, bool CAP>
MV_INL void softmax_cols(float* st, int lds, int c0, const int32_t* vis, const int32_t* lo, int t0, int t_end,
                         float* mx, float* sum, float* alpha, int32_t* bad, float cap) {
  using V = typename VT<N>::V;
  using I = typename VT<N>::I;
  const V ninf = vbcast<V>(-__builtin_inff());
  I visv, lov = I{};
  int tmax = t0;
  for (int i = 0; i < N; ++i) {
    visv[i] = vis[c0 + i];
    if constexpr (LO) lov[i] = lo[c0 + i];
    tmax = imax(tmax, imin(vis[c0 + i], t_end));
  }
  const V mold = vld<N>(mx + c0);
  V mv = mold;
  I badv = *reinterpret_cast<const typename VT<N>::IU*>(bad + c0);
  const V capv = vbcast<V>(cap), inv_cap = vbcast<V>(CAP ? 1.0f / cap : 0.0f);
  for (int t = t0; t < tmax; ++t) {
    float* sp = st + static_cast<size_t>(t - t0) * lds + c0;
    V x = vld<N>(sp);
    I seen = (I{} + t) < visv;
    if constexpr (LO) seen &= (I{} + t) >= lov;
    badv |= seen & ((x - x) != V{});  // NaN policy: x - x is NaN exactly when x is NaN or +-Inf
    if constexpr (CAP) {
      x = capv * vtanh<V, I>(x * inv_cap);
      vst<N>(sp, x);
    }
    const V xm = seen ? x : ninf;
    mv = xm > mv ? xm : mv;
  }
  *reinterpret_cast<typename VT<N>::IU*>(bad + c0) = badv;
  const V mref = mv == ninf ? V{} : mv;  // rows that saw nothing yet: any finite reference
  V s = V{};
  for (int t = t0; t < t_end; ++t) {
    float* sp = st + static_cast<size_t>(t - t0) * lds + c0;
    I seen = (I{} + t) < visv;
    if constexpr (LO) seen &= (I{} + t) >= lov;
    const V e = seen ? vexp<V, I>(vld<N>(sp) - mref) : V{};
    vst<N>(sp, e);
    s += e;
  }
  const V al = mold == ninf ? V{} : vexp<V, I>(mold - mref);
  vst<N>(alpha + c0, al);
  vst<N>(mx + c0, mv);
  vst<N>(sum + c0, vld<N>(sum + c0) * al + s);
}

// ---------------------------------------------------------------------------------- O = P V
// O[r][d0 : d0 + NV*W] = alpha[r] * O[r][...] + sum_{t0 <= t < t1} P^T[t - t0][r] V[t][...] for RB rows r
// (block-local rb + r); o: [rows][dp] fp32 scratch; vr[t - t0]: token t's V row of EV (fp32: the packed
// scratch row, or the fp32 cache row itself, see run_task; fp16 / bf16: the cache row, task_heads).
// Tokens [tlo, tfull) every row of the tile sees; tokens [t0, tlo) and [tfull, t1) only rows r with
// lo[r] <= t < vis[r] (NaN policy: a masked token is skipped, never multiplied by 0, so a NaN/Inf in V
// cannot cross the mask). Without a window tlo = t0.
template <int RB, int NV, class EV = F32>
MV_INL void pv_tile(const typename EV::T* const* __restrict vr, int dp, int d0, const float* __restrict pt,
                    int lds, int t0, int tlo, int tfull, int t1, const int32_t* __restrict vis,
                    const int32_t* __restrict lo, float* __restrict o, const float* __restrict alpha, int rb) {
  using V = typename VT<W>::V;
  V acc[RB][NV];
  MV_UNROLL(12) for (int r = 0; r < RB; ++r) {
    const V al = vbcast<V>(alpha[rb + r]);
    MV_UNROLL(2) for (int v = 0; v < NV; ++v)
      acc[r][v] = vld<W>(o + static_cast<size_t>(rb + r) * dp + d0 + v * W) * al;
  }
  const float* pp = pt + rb;
  int t = t0;
  for (; t < tlo; ++t, pp += lds) {  // below some row's window start
    const typename EV::T* vp = vr[t - t0] + d0;
    V vv[NV];
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) vv[v] = vld_elem<EV>(vp + v * W);
    MV_UNROLL(12) for (int r = 0; r < RB; ++r) {
      if (t >= lo[rb + r] && t < vis[rb + r]) {
        const V pb = vbcast<V>(pp[r]);
        MV_UNROLL(2) for (int v = 0; v < NV; ++v) acc[r][v] = vfma(pb, vv[v], acc[r][v]);
      }
    }
  }
  for (; t < tfull; ++t, pp += lds) {
    const typename EV::T* vp = vr[t - t0] + d0;
    V vv[NV];
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) vv[v] = vld_elem<EV>(vp + v * W);
    MV_UNROLL(12) for (int r = 0; r < RB; ++r) {
      const V pb = vbcast<V>(pp[r]);
      MV_UNROLL(2) for (int v = 0; v < NV; ++v) acc[r][v] = vfma(pb, vv[v], acc[r][v]);
    }
  }
  for (; t < t1; ++t, pp += lds) {
    const typename EV::T* vp = vr[t - t0] + d0;
    V vv[NV];
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) vv[v] = vld_elem<EV>(vp + v * W);
    MV_UNROLL(12) for (int r = 0; r < RB; ++r) {
      if (t < vis[rb + r]) {
        const V pb = vbcast<V>(pp[r]);
        MV_UNROLL(2) for (int v = 0; v < NV; ++v) acc[r][v] = vfma(pb, vv[v], acc[r][v]);
      }
    }
  }
  MV_UNROLL(12) for (int r = 0; r < RB; ++r)
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) vst<W>(o + static_cast<size_t>(rb + r) * dp + d0 + v * W, acc[r][v]);
}

#if MV_LEVEL >= 3
// P^T rows [0, 2 * pairs) of the block (fp32, columns [0, mbp), mbp a multiple of 8) -> bf16 pairs
// p2[e][col] = bf16(P^T[2e][col]) | bf16(P^T[2e + 1][col]) << 16, rounded to nearest even.
MV_INL void pack_p_pairs(const float* __restrict st, int lds, int mbp, int pairs, uint32_t* __restrict p2) {
  for (int e = 0; e < pairs; ++e) {
    const float* a = st + static_cast<size_t>(2 * e) * lds;
    const float* b = a + lds;
    uint32_t* dst = p2 + static_cast<size_t>(e) * lds;
    int col = 0;
    for (; col + 16 <= mbp; col += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a + col)));
      const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(b + col)));
      _mm512_storeu_si512(dst + col, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    for (; col < mbp; col += 8) {
      const __m256i lo = _mm256_cvtepu16_epi32((__m128i)_mm256_cvtneps_pbh(_mm256_loadu_ps(a + col)));
      const __m256i hi = _mm256_cvtepu16_epi32((__m128i)_mm256_cvtneps_pbh(_mm256_loadu_ps(b + col)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + col), _mm256_or_si256(lo, _mm256_slli_epi32(hi, 16)));
    }
  }
}

// pv_tile on the bf16 path: v2 holds the block's V in token pairs (pair e = tokens t0 + 2e, t0 + 2e + 1
// at v2 + e * ldv, dp 32-bit lanes), p2 the block's P^T in bf16 pairs (pack_p_pairs). Pairs inside
// [tlo, tfull), which every row of the tile sees, take one vdpbf16ps per row and vector; every other
// token is taken alone in fp32 (its V half widened, P^T from pt), masked per row as in pv_tile.
// Tokens [xa, xb) (xb > xa: pair-aligned, seen by every row of the block) are left to pv_amx.
template <int RB, int NV>
MV_INL void pv_tile_bf16(const uint32_t* __restrict v2, int dp, int d0, const float* __restrict pt,
                         const uint32_t* __restrict p2, int lds, int t0, int tlo, int tfull, int t1,
                         const int32_t* __restrict vis, const int32_t* __restrict lo, float* __restrict o,
                         const float* __restrict alpha, int rb, int xa, int xb) {
  using V = typename VT<W>::V;
  using UI = typename VT<W>::UI;
  const size_t ldv = 2 * static_cast<size_t>(dp);  // pair e sits in the scratch row of token t0 + 2e
  V acc[RB][NV];
  MV_UNROLL(12) for (int r = 0; r < RB; ++r) {
    const V al = vbcast<V>(alpha[rb + r]);
    MV_UNROLL(2) for (int v = 0; v < NV; ++v)
      acc[r][v] = vld<W>(o + static_cast<size_t>(rb + r) * dp + d0 + v * W) * al;
  }
  // token t alone: its half of the pair widened to fp32 (bf16 -> fp32 is a 16-bit shift); mask 0: every
  // row sees it, 1: rows with lo <= t < vis (below tlo: lo is set), 2: rows with t < vis (past tfull)
  auto single = [&](int t, int mask) __attribute__((always_inline)) {
    const uint32_t* vp = v2 + ((t - t0) >> 1) * ldv + d0;
    const bool high = (t - t0) & 1;
    V vv[NV];
    MV_UNROLL(2) for (int v = 0; v < NV; ++v) {
      UI w;
      __builtin_memcpy(&w, vp + v * W, sizeof(UI));
      vv[v] = (V)(high ? (w & 0xffff0000u) : (w << 16));
    }
    const float* pp = pt + static_cast<size_t>(t - t0) * lds + rb;
    MV_UNROLL(12) for (int r = 0; r < RB; ++r) {
      if ((mask == 1 && !(t >= lo[rb + r] && t < vis[rb + r])) || (mask == 2 && t >= vis[rb + r])) continue;
      const V pb = vbcast<V>(pp[r]);
      MV_UNROLL(2) for (int v = 0; v < NV; ++v) acc[r][v] = vfma(pb, vv[v], acc[r][v]);
    }
  };
  int t = t0;
  for (; t < tlo; ++t) single(t, 1);
  if (((t - t0) & 1) && t < tfull) single(t++, 0);
  auto pairs = [&](int end) __attribute__((always_inline)) {
    for (; t + 1 < end; t += 2) {
      const int e = (t - t0) >> 1;
      const uint32_t* vp = v2 + e * ldv + d0;
      const uint32_t* pp = p2 + static_cast<size_t>(e) * lds + rb;
      UI vv[NV];
      MV_UNROLL(2) for (int v = 0; v < NV; ++v) __builtin_memcpy(&vv[v], vp + v * W, sizeof(UI));
      MV_UNROLL(12) for (int r = 0; r < RB; ++r) {
        const UI pb = UI{} + pp[r];
        MV_UNROLL(2) for (int v = 0; v < NV; ++v) acc[r][v] = dot2_bf16<W>(acc[r][v], pb, vv[v]);
      }
    }
  };
  if (xb > xa) {  // (t <= xa here, on the same pair parity: the tile's tlo <= the block's)
    pairs(xa);
    t = xb;
  }
  pairs(tfull);
  for (; t < tfull; ++t) single(t, 0);
  for (; t < t1; ++t) single(t, 2);
  MV_UNROLL(12) for (int r = 0; r < RB; ++r)
    MV_UNROLL(2) for (int v = 0; v < NV; ++v)
      vst<W>(o + static_cast<size_t>(rb + r) * dp + d0 + v * W, acc[r][v]);
}
#endif

#if MV_LEVEL >= 4
// AMX (amx.h): O[rows][0, D) += P[rows][tokens] V[tokens][0, D) for every 16-row tile of the row block
// (mbp rows, a multiple of 16) over npairs token pairs from pair e0 of the block (npairs = 8, 16 or 24:
// 16-token pieces of a 48-token block; every row sees them all, so no mask and the NaN policy holds),
// D % 32 == 0. A = the rows' P in bf16 pairs: the block's P^T pairs p2 [pair][row] transposed per
// 16 rows into a16 (16 pairs, tile 2) and a8 (8 pairs, tile 5); B = V's token-pair rows (v2, ldv pairs
// apart; tiles 3-4 of 16 pairs, 6-7 of 8), 16 head dims per tile; C = O's rows, loaded, accumulated,
// stored back (after pv_tile_bf16 applied alpha and the other tokens).
MV_INL void pv_amx(const uint32_t* __restrict v2, int dp, int D, const uint32_t* __restrict p2, int lds, int e0,
                   int npairs, int mbp, float* __restrict o) {
  const size_t b_stride = 2 * static_cast<size_t>(dp) * sizeof(uint32_t);  // pair e in token row 2e's scratch
  const size_t o_stride = static_cast<size_t>(dp) * sizeof(float);
  const bool p16 = npairs >= 16, p8 = npairs % 16 == 8;
  alignas(64) uint32_t a16[16][16];
  alignas(64) uint32_t a8[16][8];
  for (int rb = 0; rb < mbp; rb += 16) {
    int e = e0;
    if (p16) {
      for (int k = 0; k < 16; ++k)
        for (int m = 0; m < 16; ++m) a16[m][k] = p2[static_cast<size_t>(e + k) * lds + rb + m];
      e += 16;
    }
    if (p8)
      for (int k = 0; k < 8; ++k)
        for (int m = 0; m < 16; ++m) a8[m][k] = p2[static_cast<size_t>(e + k) * lds + rb + m];
    float* orow = o + static_cast<size_t>(rb) * dp;
    for (int d0 = 0; d0 < D; d0 += 32) {
      MV_TILE_LOAD(0, orow + d0, o_stride);
      MV_TILE_LOAD(1, orow + d0 + 16, o_stride);
      const uint32_t* b = v2 + static_cast<size_t>(e0) * 2 * dp + d0;
      if (p16) {
        MV_TILE_LOAD(2, a16, sizeof(a16[0]));
        MV_TILE_LOAD(3, b, b_stride);
        MV_TILE_LOAD(4, b + 16, b_stride);
        MV_TILE_DPBF16(0, 2, 3);
        MV_TILE_DPBF16(1, 2, 4);
        b += static_cast<size_t>(16) * 2 * dp;
      }
      if (p8) {
        MV_TILE_LOAD(5, a8, sizeof(a8[0]));
        MV_TILE_LOAD(6, b, b_stride);
        MV_TILE_LOAD(7, b + 16, b_stride);
        MV_TILE_DPBF16(0, 5, 6);
        MV_TILE_DPBF16(1, 5, 7);
      }
      MV_TILE_STORE(0, orow + d0, o_stride);
      MV_TILE_STORE(1, orow + d0 + 16, o_stride);
    }
  }
}
#endif

// DOT: the bf16 path (pv_tile_bf16 on v2 / p2; vr unused), else pv_tile on vr (v2 / p2 unused).
template <int RB, bool DOT, class EV = F32>
inline void pv_rows(const typename EV::T* const* vr, const uint32_t* v2, const uint32_t* p2, int dp, int D,
                    const float* pt, int lds, int t0, int t1, const int32_t* vis, const int32_t* lo, float* o,
                    const float* alpha, int rb, int xa, int xb) {
  int tfull = t1, tlo = t0;
  for (int r = 0; r < RB; ++r) tfull = imin(tfull, imax(vis[rb + r], t0));
  if (lo != nullptr) {
    for (int r = 0; r < RB; ++r) tlo = imax(tlo, lo[rb + r]);
    tlo = imin(tlo, t1);
    tfull = imax(tfull, tlo);
  }
  int d0 = 0;
#if MV_LEVEL >= 3
  if constexpr (DOT) {  // (pairs are zero up to dp >= D rounded up to W)
    for (; d0 + 2 * W <= D; d0 += 2 * W)
      pv_tile_bf16<RB, 2>(v2, dp, d0, pt, p2, lds, t0, tlo, tfull, t1, vis, lo, o, alpha, rb, xa, xb);
    for (; d0 < D; d0 += W)
      pv_tile_bf16<RB, 1>(v2, dp, d0, pt, p2, lds, t0, tlo, tfull, t1, vis, lo, o, alpha, rb, xa, xb);
    return;
  }
#endif
  (void)v2;
  (void)p2;
  (void)xa;
  (void)xb;
  for (; d0 + 2 * W <= D; d0 += 2 * W)  // never past D: fp32 V rows may be the cache's own
    pv_tile<RB, 2, EV>(vr, dp, d0, pt, lds, t0, tlo, tfull, t1, vis, lo, o, alpha, rb);
  for (; d0 < D; d0 += W) pv_tile<RB, 1, EV>(vr, dp, d0, pt, lds, t0, tlo, tfull, t1, vis, lo, o, alpha, rb);
}

// `rows` (1 .. RB) rows starting at block-local rb.
template <int RB, bool DOT, class EV = F32>
inline void pv_dispatch(int rows, const typename EV::T* const* vr, const uint32_t* v2, const uint32_t* p2, int dp,
                        int D, const float* pt, int lds, int t0, int t1, const int32_t* vis, const int32_t* lo,
                        float* o, const float* alpha, int rb, int xa, int xb) {
  if constexpr (RB > 1) {
    if (rows < RB) {
      pv_dispatch<RB - 1, DOT, EV>(rows, vr, v2, p2, dp, D, pt, lds, t0, t1, vis, lo, o, alpha, rb, xa, xb);
      return;
    }
  }
  pv_rows<RB, DOT, EV>(vr, v2, p2, dp, D, pt, lds, t0, t1, vis, lo, o, alpha, rb, xa, xb);
}

// The online softmax of one (row block, token block): full-width vectors over the big tiles' columns,
// G-lane ones over the remainder.
template <bool LO, bool CAP>
inline void softmax_block(const TaskScratch& sc, int lds, int mbp, int nbig, const int32_t* bvis, const int32_t* blo,
                          int tb0, int te, int32_t* bad, float cap) {
  for (int col = 0; col < mbp;) {
    if (col + W <= nbig * 2 * W) {
      softmax_cols<W, LO, CAP>(sc.st, lds, col, bvis, blo, tb0, te, sc.mx, sc.sum, sc.alpha, bad, cap);
      col += W;
    } else {
      softmax_cols<G, LO, CAP>(sc.st, lds, col, bvis, blo, tb0, te, sc.mx, sc.sum, sc.alpha, bad, cap);
      col += G;
    }
  }
}

// Normalise rows m0 .. m0 + mb - 1 of a row block (state in sc: o, mx, sum; bad the block's NaN flags)
// and write them: a row's only partial goes straight to out (q's dtype), else to its partial slot.
template <class EQ>
MV_INL void write_rows(const TreeAttentionParams& p, const TaskScratch& sc, int m0, int mb, int dp,
                       const int32_t* orow, const int32_t* slot, const int32_t* head, const int32_t* bad) {
  using T = typename EQ::T;
  const int D = p.head_dim;
  for (int i = 0; i < mb; ++i) {
    const int m = m0 + i;
    const float l = sc.sum[i];
    const bool seen = l > 0.0f;
    float inv = seen ? 1.0f / l : 0.0f;
    float lse = seen ? sc.mx[i] + __builtin_logf(l) : -__builtin_inff();
    if (bad[i]) inv = lse = __builtin_nanf("");  // NaN policy (docs/errors.md): the whole row NaN
    const float* orow_p = sc.o + static_cast<size_t>(i) * dp;
    if (orow[m] >= 0) {
      p.lse[partial_lse_offset(orow[m], head[m], p.num_qo_heads)] = lse;
      T* dst = static_cast<T*>(p.out) + partial_out_offset(orow[m], head[m], p.num_qo_heads, D);
      for (int d = 0; d < D; ++d) dst[d] = EQ::store(orow_p[d] * inv);
    } else {
      p.partial_lse[partial_lse_offset(slot[m], head[m], p.num_qo_heads)] = lse;
      float* dst = p.partial_out + partial_out_offset(slot[m], head[m], p.num_qo_heads, D);
      for (int d = 0; d < D; ++d) dst[d] = orow_p[d] * inv;
    }
  }
}

#if MV_LEVEL >= 1
template <class E>
int64_t run_heads(const TreeAttentionParams& p, int32_t item, int32_t kh0, int32_t nh, const TaskScratch& sc);
#endif

// ---------------------------------------------------------------------------------- one task
// EQ: q / out element type; EKV: the caches' (EQ, or fp8 with fp16 / bf16 EQ).
template <class EQ, class EKV>
int64_t run_task(const TreeAttentionParams& p, int32_t item, int32_t kh, int32_t next_item, int32_t next_kh,
                 const TaskScratch& sc) {
  using T = typename EQ::T;
  constexpr bool kDot = kDotBf16<EQ, EKV>;  // S^T by bf16 dot products (see the top of this file)
  const int D = p.head_dim;
  const int E2 = (D + 1) / 2;  // head-dim pairs of the bf16 dot products
  const int group = gqa_group(p.num_qo_heads, p.num_kv_heads);
  const int32_t nr = p.item_num_readers[item];
  const int M = nr * group;
  if (M == 0) return 0;  // capacity padding item
#if MV_LEVEL >= 1
  // A light task with caches in q's dtype is the one-head case of a task of several KV heads (run_heads:
  // rows read in place, scores by qk_rows_direct), so both compute alike.
  if constexpr (std::is_same_v<EQ, EKV>)
    if (M <= kLightRows && D % W == 0) return run_heads<EQ>(p, item, kh, 1, sc);
#endif
  // AMX score tiles (MV_LEVEL 4) for the row tiles of 32 rows when the head dim is whole 32-dim chunks;
  // the G-lane remainder tiles and other head dims take the vdpbf16ps tiles.
  constexpr bool kAmx = kDot && MV_LEVEL >= 4;
  const bool amx_on = kAmx && D % 32 == 0 && M >= 32;
#if MV_LEVEL >= 4
  amx::TileConfig saved_tiles;  // the thread's tile configuration before this task (amx.h)
  if (amx_on) amx::configure(&saved_tiles);
#endif
  const int32_t r0 = p.item_reader_start[item];
  const int32_t slot0 = p.item_partial_start[item];
  TaskCtx c{&p, p.item_node[item], p.item_kv_start[item], kh, D, static_cast<int>(round_up64(D, kDimPad)),
            nullptr, nullptr, 1.0f, 1.0f};
  bind_rows(c);
  if constexpr (kIsFp8<EKV>) {  // per tensor ([1]) or per KV head ([num_kv_heads])
    const int si = p.kv_scale_per_head ? kh : 0;
    c.ks = p.k_scale[si];
    c.vs = p.v_scale[si];
  }
  const int dp = c.dp;
  int32_t len = p.item_kv_len[item];
  // Sliding window: the task starts at the smallest first visible token of its readers (the chunk's
  // tokens below it are neither loaded nor computed); each row then masks below its own start.
  const bool has_lo = p.reader_lo != nullptr;
  if (has_lo) {
    int32_t shift = len;
    for (int32_t j = 0; j < nr; ++j) shift = imin(shift, window_lo_in_chunk(p.reader_lo, r0 + j, c.kv_start));
    c.kv_start += shift;
    len -= shift;
  }
  // A task with one row block consumes each token block right after loading it: K/V then live in a
  // one-block window (48 rows, L1/L2) instead of the whole chunk, leaving L2 to the next task's
  // prefetched chunk. kb/vb are then re-based per token block so that row t sits at kb + t * dp.
  const bool window = M <= kRowBlock;
  // fp32 V rows are read by P V straight from the cache (only K is packed): each tile streams them
  // token by token, one line per row and vector, so the rows' 4 KiB stride costs nothing there (it
  // does in S^T = K Q^T, which broadcasts 12 rows' elements per step: those alias in one L1 set), and
  // the copy of V is saved. Needs D % W == 0 (the tiles then read exactly D floats of a row). Never
  // for fp16 / bf16 / fp8 caches (their rows are converted, and fp8 ones scaled, into the scratch).
  const bool v_direct = std::is_same_v<EKV, F32> && window && D % W == 0;
  const float* vrows[kTokenBlock];  // the current token block's V rows (packed or cache)
  // Tokens per block: a light task (one row tile: at most kLightRows rows) copies a block of
  // kLightTokenBlock so that its K/V window (1 KiB per token at d = 128 fp32) stays in L1 while it is
  // packed and read; a task with many rows amortises the per-block softmax and output rescale over the
  // full kTokenBlock (its window lives in L2 anyway, next to Q^T and O).
  const int tbk = window && M <= kLightRows ? kLightTokenBlock : kTokenBlock;
  const bool cap_on = p.softcap > 0.0f;
  float* const kbase = sc.kv;
  float* const vbase = sc.kv + task_tokens_pad(len) * dp;
  c.kb = kbase;
  c.vb = vbase;

  const int rp = static_cast<int>(task_rows_pad(M));
  int32_t* vis = sc.rows;
  int32_t* slot = vis + rp;
  int32_t* head = slot + rp;
  int32_t* orow = head + rp;
  int32_t* lo = orow + rp;   // first visible token of the row in the (shifted) chunk: 0 without a window
  int32_t* bad = lo + rp;  // [kRowBlock] of the current row block: a visible score was NaN/Inf
  int max_vis = 0;
  for (int m = 0; m < M; ++m) {
    const int32_t rd = r0 + packed_reader(m, group);
    vis[m] = visible_in_chunk(p.reader_limit[rd], c.kv_start, len);
    lo[m] = window_lo_in_chunk(p.reader_lo, rd, c.kv_start);
    slot[m] = slot0 + packed_reader(m, group);
    head[m] = packed_head(m, group, kh);
    const int32_t qrow = p.reader_row[rd];
    orow[m] = p.row_partial_indptr[qrow + 1] - p.row_partial_indptr[qrow] == 1 ? qrow : -1;
    max_vis = imax(max_vis, vis[m]);
  }
  for (int m = M; m < rp; ++m) {
    vis[m] = 0;
    lo[m] = 0;
    slot[m] = -1;
    head[m] = kh * group;
    orow[m] = -1;
  }

  int64_t bytes = 0;
  const T* qp = static_cast<const T*>(p.q);
  TaskCtx cn = c;  // the next task's chunk (prefetched during this one)
  int next_len = 0;
  if (next_item >= 0 && p.item_num_readers[next_item] > 0) {
    cn.node = p.item_node[next_item];
    cn.kv_start = p.item_kv_start[next_item];
    cn.kh = next_kh;
    bind_rows(cn);
    next_len = p.item_kv_len[next_item];
    if (has_lo) {  // prefetch from the next task's first visible token
      int32_t shift = next_len;
      const int32_t nr0 = p.item_reader_start[next_item];
      for (int32_t j = 0; j < p.item_num_readers[next_item]; ++j)
        shift = imin(shift, window_lo_in_chunk(p.reader_lo, nr0 + j, cn.kv_start));
      cn.kv_start += shift;
      next_len -= shift;
    }
  }
  Prefetch2<EKV> pf{{&c, 0, imin(tbk, max_vis)}, {&cn, 0, next_len}};
  pf.own.finish();
  for (int m0 = 0; m0 < M; m0 += kRowBlock) {
    const int mb = imin(kRowBlock, M - m0);
    const int mbp = static_cast<int>(round_up64(mb, amx_on ? 16 : G));  // (AMX P V: 16-row tiles)
    const int lds = mbp;  // S^T / Qt row stride
    const int32_t* bvis = vis + m0;
    const int32_t* blo = has_lo ? lo + m0 : nullptr;
    int tmax = 0, tmin = has_lo ? max_vis : 0;  // the block's rows see tokens [tmin, tmax) at most
    for (int i = 0; i < mb; ++i) tmax = imax(tmax, bvis[i]);
    if (has_lo)
      for (int i = 0; i < mb; ++i) tmin = imin(tmin, lo[m0 + i]);
    // Q^T of the block, pre-scaled by sm_scale (so scores and lse include it); pad columns 0.
    // (kDot: [E2][lds] 32-bit pairs of the unscaled bf16 q, in the same scratch.)
    float* qt = sc.qt;
    uint32_t* qt2 = reinterpret_cast<uint32_t*>(sc.qt);
    for (int i = 0; i < mb; ++i) {
      const int m = m0 + i;
      const int32_t row = p.reader_row[r0 + packed_reader(m, group)];
      const T* src = qp + row * p.q_stride_row + static_cast<int64_t>(head[m]) * p.q_stride_head;
      if constexpr (kDot) {
        for (int e = 0; e < E2; ++e) {
          const uint32_t hi = 2 * e + 1 < D ? src[2 * e + 1] : 0;
          qt2[static_cast<size_t>(e) * lds + i] = static_cast<uint32_t>(src[2 * e]) | hi << 16;
        }
      } else {
        for (int d = 0; d < D; ++d) qt[static_cast<size_t>(d) * lds + i] = EQ::load(src[d]) * p.sm_scale;
      }
    }
    for (int i = mb; i < mbp; ++i) {
      if constexpr (kDot) {
        for (int e = 0; e < E2; ++e) qt2[static_cast<size_t>(e) * lds + i] = 0;
      } else {
        for (int d = 0; d < D; ++d) qt[static_cast<size_t>(d) * lds + i] = 0.0f;
      }
    }
    for (int i = 0; i < mbp; ++i) {
      sc.mx[i] = -__builtin_inff();
      sc.sum[i] = 0.0f;
      bad[i] = 0;
    }
    for (int64_t i = 0; i < static_cast<int64_t>(mbp) * dp; ++i) sc.o[i] = 0.0f;

    // Token block by token block (online softmax). The first row block also loads each token block
    // from the caches while the next one is being prefetched.
    const int t_stop = m0 == 0 ? max_vis : tmax;
    const int nbig = mbp / (2 * W);
    // Prefetch rows issued per register tile: spread a whole token block over the tiles of one block
    // (a light task - few rows - has few tiles per block: 4 rows per tile would leave most of the next
    // block to a burst right before it is packed, serialising its loads with the compute).
    const int tiles = nbig * (tbk / QK_TB) + (mbp - nbig * 2 * W) / G * (tbk / QK_TB_SMALL) +
                      (mb + PV_RB - 1) / PV_RB;
    const int pf_rows = imax(4, (tbk + tiles - 1) / tiles);
    for (int tb0 = 0; tb0 < t_stop; tb0 += tbk) {
      if (m0 == 0) {
        const int tb1 = imin(tb0 + tbk, max_vis);
        pf.own.finish();  // the rest of this block's prefetches, if compute did not issue them all
        if (window) {
          const ptrdiff_t shift = static_cast<ptrdiff_t>(tb0) * dp;
          c.kb = reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(kbase) - shift * sizeof(float));
          c.vb = reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(vbase) - shift * sizeof(float));
        }
        bytes += pack_rows<EKV, kDot>(c, tb0, tb1, v_direct, vrows);
        pf.own = Prefetcher<EKV>{&c, tb1, imin(tb1 + tbk, max_vis)};
        for (int t = tb1; t < tb0 + tbk; ++t)  // tiles past the chunk read zeros
          for (int d = 0; d < dp; ++d) c.kb[static_cast<size_t>(t) * dp + d] = 0.0f;
      }
      if (!v_direct)
        for (int t = tb0; t < tb0 + tbk; ++t) vrows[t - tb0] = c.vb + static_cast<size_t>(t) * dp;
      if (tb0 >= tmax || tb0 + tbk <= tmin) continue;  // nothing of the block's rows in this block
      const int te = imin(tmax, tb0 + tbk);
      // S^T[t - tb0][:] for the block's row tiles (each up to its own last visible token).
      for (int col = 0; col < mbp;) {
        const bool big = col < nbig * 2 * W;
        const int width = big ? 2 * W : G;
        int tt = 0;
        for (int i = 0; i < width; ++i) tt = imax(tt, bvis[col + i]);
        const int tend = imin(tt, te);
        const float* kp = c.kb + static_cast<size_t>(tb0) * dp;
        if (big && amx_on) {
#if MV_LEVEL >= 4
          for (int t0 = tb0; t0 < tend; t0 += 16, kp += 16 * dp) {
            qk_tile_amx(reinterpret_cast<const uint16_t*>(kp), 2 * dp, qt2 + col, lds, D,
                        sc.st + static_cast<size_t>(t0 - tb0) * lds + col, lds, p.sm_scale);
            pf.step(pf_rows);
          }
#endif
        } else if (big) {
          for (int t0 = tb0; t0 < tend; t0 += QK_TB, kp += QK_TB * dp) {
            float* sp = sc.st + static_cast<size_t>(t0 - tb0) * lds + col;
#if MV_LEVEL >= 3
            if constexpr (kDot)
              qk_tile_bf16<W, 2, QK_TB>(reinterpret_cast<const uint16_t*>(kp), 2 * dp, qt2 + col, lds, E2, sp, lds,
                                        p.sm_scale);
            else
#endif
              qk_tile<W, 2, QK_TB>(kp, dp, qt + col, lds, D, sp, lds);
            pf.step(pf_rows);
          }
        } else {
          for (int t0 = tb0; t0 < tend; t0 += QK_TB_SMALL, kp += QK_TB_SMALL * dp) {
            float* sp = sc.st + static_cast<size_t>(t0 - tb0) * lds + col;
#if MV_LEVEL >= 3
            if constexpr (kDot)
              qk_tile_bf16<G, 1, QK_TB_SMALL>(reinterpret_cast<const uint16_t*>(kp), 2 * dp, qt2 + col, lds, E2, sp,
                                              lds, p.sm_scale);
            else
#endif
              qk_tile<G, 1, QK_TB_SMALL>(kp, dp, qt + col, lds, D, sp, lds);
            pf.step(pf_rows);
          }
        }
        col += width;
      }
      // full-width vectors over the big tiles' columns, G-lane ones over the remainder
      if (!has_lo && !cap_on)
        softmax_block<false, false>(sc, lds, mbp, nbig, bvis, blo, tb0, te, bad, p.softcap);
      else if (!cap_on)
        softmax_block<true, false>(sc, lds, mbp, nbig, bvis, blo, tb0, te, bad, p.softcap);
      else if (!has_lo)
        softmax_block<false, true>(sc, lds, mbp, nbig, bvis, blo, tb0, te, bad, p.softcap);
      else
        softmax_block<true, true>(sc, lds, mbp, nbig, bvis, blo, tb0, te, bad, p.softcap);
      // O = alpha O + P V in tiles of PV_RB rows (rows that see nothing of this block keep alpha = 1).
      // (kDot: P^T's token pairs below te rounded to bf16 first.)
      const uint32_t* v2 = reinterpret_cast<const uint32_t*>(c.vb + static_cast<size_t>(tb0) * dp);
#if MV_LEVEL >= 3
      if constexpr (kDot) pack_p_pairs(sc.st, lds, mbp, (te - tb0) / 2, sc.p2);
#endif
      // (AMX: tokens [xa, xb) - whole 16-token pieces from a pair boundary, seen by every row of the
      // block - go through pv_amx after the tiles below, which skip them.)
      int xa = tb0, xb = tb0;
#if MV_LEVEL >= 4
      if (amx_on) {
        int lo_all = tb0, full_all = te;
        for (int i = 0; i < mb; ++i) {
          full_all = imin(full_all, bvis[i]);
          if (has_lo) lo_all = imax(lo_all, blo[i]);
        }
        const int a = tb0 + ((lo_all - tb0 + 1) & ~1);
        const int n = full_all > a ? (full_all - a) / 16 * 16 : 0;
        if (n > 0) {
          xa = a;
          xb = a + n;
        }
      }
#endif
      for (int rb = 0; rb < mb; rb += PV_RB) {
        const int rows = imin(PV_RB, mb - rb);
        int tb = 0;
        for (int r = 0; r < rows; ++r) tb = imax(tb, bvis[rb + r]);
        const int t1 = imin(tb, te);
        if (t1 > tb0)
          pv_dispatch<PV_RB, kDot>(rows, vrows, v2, sc.p2, dp, D, sc.st, lds, tb0, t1, bvis, blo, sc.o, sc.alpha,
                                   rb, xa, xb);
        pf.step(pf_rows);
      }
#if MV_LEVEL >= 4
      if (xb > xa) pv_amx(v2, dp, D, sc.p2, lds, (xa - tb0) / 2, (xb - xa) / 2, mbp, sc.o);
#endif
    }
    write_rows<EQ>(p, sc, m0, mb, dp, orow, slot, head, bad);
  }
#if MV_LEVEL >= 4
  if (amx_on) amx::restore(saved_tiles);
#endif
  return bytes;
}

#if MV_LEVEL >= 1
// ---------------------------------------------------------------------------------- several KV heads
// A light task over KV heads kh0 .. kh0 + nh - 1 of one work item (items of at most kHeadsRows packed
// rows, caches in q's dtype, D % 8 == 0: isa_kernels.h FwdHeadsFn for nh >= 1, and run_task's light
// tasks as nh = 1): token block by token block, each head of the block in turn (qk_rows_direct on the
// block's K rows, the online softmax, P V; every row read in place, fp16 / bf16 converted in
// registers). In a token-major cache a token's rows of those heads are adjacent (nh x D x elem
// bytes), so the task reads whole runs of each token row - what the hardware prefetchers follow -
// instead of one head's rows a page apart (csrc/tools/stream_bench.cpp: "strided, N heads per task"
// against "strided rows"). Each head keeps its own q rows, o rows and softmax state
// (TaskScratch::heads); the arithmetic per head does not depend on nh, so the results are bitwise
// those of nh one-head tasks.
static_assert(kLightRows == kHeadsRows, "a task of several heads is a light task");
template <class E>
int64_t run_heads(const TreeAttentionParams& p, int32_t item, int32_t kh0, int32_t nh, const TaskScratch& sc) {
  using T = typename E::T;
  const int D = p.head_dim;
  const int group = gqa_group(p.num_qo_heads, p.num_kv_heads);
  const int32_t nr = p.item_num_readers[item];
  const int M = nr * group;
  if (M == 0) return 0;  // capacity padding item
  const int32_t r0 = p.item_reader_start[item];
  const int32_t slot0 = p.item_partial_start[item];
  const int dp = static_cast<int>(round_up64(D, kDimPad));
  int32_t kv_start = p.item_kv_start[item];
  int32_t len = p.item_kv_len[item];
  const bool has_lo = p.reader_lo != nullptr;
  if (has_lo) {  // from the smallest first visible token of the readers (as run_task)
    int32_t shift = len;
    for (int32_t j = 0; j < nr; ++j) shift = imin(shift, window_lo_in_chunk(p.reader_lo, r0 + j, kv_start));
    kv_start += shift;
    len -= shift;
  }
  TaskCtx c[kMaxTaskHeads];
  for (int h = 0; h < nh; ++h) {
    c[h] = TaskCtx{&p, p.item_node[item], kv_start, kh0 + h, D, dp, nullptr, nullptr, 1.0f, 1.0f};
    bind_rows(c[h]);
  }
  const int rp = static_cast<int>(task_rows_pad(M));
  int32_t* vis = sc.rows;
  int32_t* slot = vis + rp;
  int32_t* head = slot + rp;  // query heads of the current KV head
  int32_t* orow = head + rp;
  int32_t* lo = orow + rp;
  int max_vis = 0;
  for (int m = 0; m < M; ++m) {
    const int32_t rd = r0 + packed_reader(m, group);
    vis[m] = visible_in_chunk(p.reader_limit[rd], kv_start, len);
    lo[m] = window_lo_in_chunk(p.reader_lo, rd, kv_start);
    slot[m] = slot0 + packed_reader(m, group);
    const int32_t qrow = p.reader_row[rd];
    orow[m] = p.row_partial_indptr[qrow + 1] - p.row_partial_indptr[qrow] == 1 ? qrow : -1;
    max_vis = imax(max_vis, vis[m]);
  }
  int tmin = has_lo ? max_vis : 0;  // the rows see tokens [tmin, max_vis) at most (as run_task)
  if (has_lo)
    for (int m = 0; m < M; ++m) tmin = imin(tmin, lo[m]);
  const int mbp = static_cast<int>(round_up64(M, G)), lds = mbp, nbig = mbp / (2 * W), r4 = (M + 3) & ~3;
  for (int m = M; m < mbp; ++m) vis[m] = lo[m] = 0;
  const int32_t* blo = has_lo ? lo : nullptr;
  // Per head: q rows [kHeadsRows][dp] (times sm_scale; rows M .. r4 zero), then its row-block state.
  const T* qp = static_cast<const T*>(p.q);
  TaskScratch hs[kMaxTaskHeads];
  float* qr[kMaxTaskHeads];
  int32_t* bad[kMaxTaskHeads];
  for (int h = 0; h < nh; ++h) {
    float* base = sc.heads + h * task_head_floats(D);
    qr[h] = base;
    hs[h] = sc;
    hs[h].o = base + kHeadsRows * dp;
    hs[h].mx = hs[h].o + kHeadsRows * dp;
    hs[h].sum = hs[h].mx + kHeadsRows;
    hs[h].alpha = hs[h].sum + kHeadsRows;
    bad[h] = reinterpret_cast<int32_t*>(hs[h].alpha + kHeadsRows);
    for (int m = 0; m < r4; ++m) {
      float* dst = qr[h] + static_cast<size_t>(m) * dp;
      if (m >= M) {
        for (int d = 0; d < D; ++d) dst[d] = 0.0f;
        continue;
      }
      const int32_t row = p.reader_row[r0 + packed_reader(m, group)];
      const int64_t qh = packed_head(m, group, kh0 + h);
      const T* src = qp + row * p.q_stride_row + qh * p.q_stride_head;
      for (int d = 0; d < D; ++d) dst[d] = E::load(src[d]) * p.sm_scale;
    }
    for (int i = 0; i < mbp; ++i) {
      hs[h].mx[i] = -__builtin_inff();
      hs[h].sum[i] = 0.0f;
      bad[h][i] = 0;
    }
    for (int64_t i = 0; i < static_cast<int64_t>(mbp) * dp; ++i) hs[h].o[i] = 0.0f;
  }
  constexpr int tbk = kLightTokenBlock;
  for (int h = 0; h < nh; ++h) Prefetcher<E>{&c[h], 0, imin(tbk, max_vis)}.finish();
  const T* krows[tbk];  // the current head's K / V rows of the block, in the cache
  const T* vrows[tbk];
  int64_t bytes = 0;
  for (int tb0 = 0; tb0 < max_vis; tb0 += tbk) {
    const int te = imin(tb0 + tbk, max_vis);
    bytes += 2 * static_cast<int64_t>(te - tb0) * D * nh * static_cast<int64_t>(sizeof(T));
    const bool skip = tb0 + tbk <= tmin;  // below every row's window: counted as loaded, not computed
    for (int h = 0; h < nh; ++h) {
      Prefetcher<E> pf{&c[h], te, imin(te + tbk, max_vis)};  // this head's next block
      if (skip) {
        pf.finish();
        continue;
      }
      for (int t = tb0; t < te; ++t) {
        krows[t - tb0] = k_row<E>(c[h], t);
        vrows[t - tb0] = v_row<E>(c[h], t);
      }
      for (int t0 = tb0; t0 < te; t0 += 2) {
        qk_rows_direct<E>(krows + (t0 - tb0), qr[h], dp, r4, D, t0, imin(t0 + 2, te),
                       sc.st + static_cast<size_t>(t0 - tb0) * lds, lds);
        pf.step(2);
      }
      pf.finish();
      if (!has_lo && p.softcap <= 0.0f)
        softmax_block<false, false>(hs[h], lds, mbp, nbig, vis, blo, tb0, te, bad[h], p.softcap);
      else if (p.softcap <= 0.0f)
        softmax_block<true, false>(hs[h], lds, mbp, nbig, vis, blo, tb0, te, bad[h], p.softcap);
      else if (!has_lo)
        softmax_block<false, true>(hs[h], lds, mbp, nbig, vis, blo, tb0, te, bad[h], p.softcap);
      else
        softmax_block<true, true>(hs[h], lds, mbp, nbig, vis, blo, tb0, te, bad[h], p.softcap);
      for (int rb = 0; rb < M; rb += PV_RB) {
        const int rows = imin(PV_RB, M - rb);
        int tb = 0;
        for (int r = 0; r < rows; ++r) tb = imax(tb, vis[rb + r]);
        const int t1 = imin(tb, te);
        if (t1 > tb0)
          pv_dispatch<PV_RB, false, E>(rows, vrows, nullptr, nullptr, dp, D, sc.st, lds, tb0, t1, vis, blo, hs[h].o,
                                    hs[h].alpha, rb, tb0, tb0);
      }
    }
  }
  for (int h = 0; h < nh; ++h) {
    for (int m = 0; m < M; ++m) head[m] = packed_head(m, group, kh0 + h);
    write_rows<E>(p, hs[h], 0, M, dp, orow, slot, head, bad[h]);
  }
  return bytes;
}

int64_t task_heads(const TreeAttentionParams& p, int32_t item, int32_t kh0, int32_t nh, const TaskScratch& s) {
  switch (p.dtype) {  // (the driver sends q's dtype for the caches, never fp8: heads_per_task)
    case DType::kFloat32: return run_heads<F32>(p, item, kh0, nh, s);
    case DType::kFloat16: return run_heads<F16>(p, item, kh0, nh, s);
    case DType::kBFloat16: return run_heads<BF16>(p, item, kh0, nh, s);
    default: return 0;
  }
}
#endif

// ---------------------------------------------------------------------------------- entry points
// One task of any dtype combination (isa_kernels.h FwdTaskFn): q's dtype, and the caches' (kv_dtype:
// q's, or fp8 with fp16 / bf16 q; a kv_dtype that is not fp8 means q's, params.h). The driver
// (tree_attention.cpp) refuses an fp8 kv_dtype with fp32 q before any task runs.
template <class EQ>
MV_INL int64_t task_q(const TreeAttentionParams& p, int32_t item, int32_t kh, int32_t next_item, int32_t next_kh,
                      const TaskScratch& s) {
  switch (p.kv_dtype) {
    case DType::kFloat8E4M3: return run_task<EQ, FP8E4M3>(p, item, kh, next_item, next_kh, s);
    case DType::kFloat8E5M2: return run_task<EQ, FP8E5M2>(p, item, kh, next_item, next_kh, s);
    default: return run_task<EQ, EQ>(p, item, kh, next_item, next_kh, s);
  }
}

int64_t task(const TreeAttentionParams& p, int32_t item, int32_t kh, int32_t next_item, int32_t next_kh,
             const TaskScratch& s) {
  switch (p.dtype) {
    case DType::kFloat32: return run_task<F32, F32>(p, item, kh, next_item, next_kh, s);
    case DType::kFloat16: return task_q<F16>(p, item, kh, next_item, next_kh, s);
    case DType::kBFloat16: return task_q<BF16>(p, item, kh, next_item, next_kh, s);
    default: return 0;  // not a q dtype (the driver refuses it)
  }
}

// The FMA rate this ISA build can reach (isa_kernels.h FmaLoopFn): kFmaChains independent chains of
// W-lane fused multiply-adds held in registers (no memory traffic), `iters` rounds; *flops gets the
// flops done (2 per lane per FMA). Returns a value that depends on every chain (so the compiler keeps
// them all). Timed on every thread by cpu_fma_peak (isa_dispatch.cpp): the FMA roof of the roofline.
float fma_loop(int64_t iters, int64_t* flops) {
  using V = VT<W>::V;
  constexpr int kFmaChains = W == 16 ? 12 : 10;  // enough chains to cover FMA latency x pipes, in registers
  V acc[kFmaChains];
  const V b = vbcast<V>(0.999f), c = vbcast<V>(1e-3f);
  for (int i = 0; i < kFmaChains; ++i) acc[i] = vbcast<V>(static_cast<float>(i));
  for (int64_t k = 0; k < iters; ++k) {
    MV_UNROLL(12) for (int i = 0; i < kFmaChains; ++i) acc[i] = vfma(acc[i], b, c);  // (not foldable:
  }                                                                                    // fp rounding)
  float s = 0.0f;
  for (int i = 0; i < kFmaChains; ++i)
    for (int l = 0; l < W; ++l) s += acc[i][l];
  *flops = 2 * static_cast<int64_t>(W) * kFmaChains * iters;
  return s;
}

}  // namespace fwd
}  // namespace
}  // namespace multiverse::cpu
