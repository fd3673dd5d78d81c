// CUDA tree attention over a plan (docs/plan.md). One CTA per (work item, KV head).
//
// Tensor-core path (fp16/bf16, head_dim 64/128/256): WARPS warps, each owning 16 packed rows
// (reader x GQA head) of a WARPS x 16-row tile: 4 warps (64 rows), or 8 warps (128 rows, head_dim
// 64/128) when an item has more than 64 packed rows, so that a chunk read by up to 128 packed rows is
// loaded from HBM once instead of once per 64-row pass. (16 warps / 256 rows would cap registers at
// 128 per thread: 8-140 bytes of spills on sm_90a.) The item's KV chunk is streamed through shared memory in
// blocks of BN tokens with cp.async (16-byte copies, double-buffered: block b+1 is in flight while
// block b is computed), so every K/V byte of the chunk is fetched from HBM once for all rows of the
// tile. S = Q K^T and O += P V use mma.sync.m16n8k16 (fp32 accumulate) with ldmatrix fragments;
// the softmax is online (FlashAttention-2 style, base-2 exponent, sm_scale * log2(e) folded in).
//
// SIMT path (fp32 or other head dims): one warp per packed row, lanes split head_dim.
//
// Variants (docs/design.md "Attention variants"; both kernels, template bool VAR so that the plain
// kernels compile exactly as without them): a sliding window (the plan's reader_lo: row r sees token t
// of the chunk iff lo_r <= t < vis_r) and the logit soft-cap (s = c * tanh(sm_scale * q.k / c) before
// the mask and the max). The tensor-core kernel starts a row tile's KV blocks at the tile's smallest lo,
// so tokens below it are neither loaded nor counted; the SIMT kernel walks each row's [lo, vis).
//
// fp8 KV caches (p.kv_dtype e4m3fn / e5m2, fp16/bf16 q; template bool F8 of both kernels, so that the
// other kernels compile exactly as without it): key = float(k8) * k_scale[kv head], value likewise. The
// tensor-core kernel streams the fp8 bytes of each KV block with the same 16-byte cp.async copies (16
// fp8 elements each) into a double-buffered byte staging area, and converts the block into q's dtype in
// the (single-stage) K/V tiles before its mma loop; the conversion is exact (every e4m3 / e5m2 value is
// an fp16 and a bf16 value; NaN and Inf stay NaN and Inf), so the scales are not applied there but
// folded, in fp32, into the score scale (k_scale, the CTA's KV head) and the epilogue's 1 / l (v_scale):
// s = sm_scale k_scale (q . k8), out = v_scale (P v8) / l, the reference's values up to fp32 rounding.
// The SIMT kernel converts each element it loads (same folding). Bytes are counted 1 per fp8 element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "multiverse/cuda_kernels.h"
#include "multiverse/index_math.h"

namespace multiverse::cuda {
namespace {

constexpr int kWarps = 4;               // SIMT path; the narrow tensor-core tile
constexpr int kThreads = kWarps * 32;
constexpr int kWideWarps = 8;           // the wide tensor-core tile (128 packed rows)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <class T> struct Pack2;
template <> struct Pack2<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half from_float(float a) { return __float2half_rn(a); }
};
template <> struct Pack2<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float a) { return __float2bfloat16_rn(a); }
};

// D = A(16x16) * B(16x8) + D, fp32 accumulate.
template <class T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, const uint32_t* b);
template <>
__device__ __forceinline__ void mma16816<__half>(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// 16-byte async global->shared copy; src_bytes = 0 zero-fills the destination (out-of-range rows).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Two e4m3fn values (the low two bytes of x, lowest address first) -> a half2 word, exact. sm_89+ has
// the hardware conversion (its NaN S.1111.111 -> an fp16 NaN, exact elsewhere); older targets (the
// compute_80 PTX of the build) decode the bits: normal S.EEEE.MMM (bias 7) is the fp16 S.(E+8).MMM0000000
// (bias 15), a subnormal M * 2^-9 is a normal fp16 (exact through float), S.1111.111 is NaN.
__device__ __forceinline__ uint32_t e4m3x2_to_half2(uint32_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  uint32_t out = 0;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t b = (x >> (8 * i)) & 0xffu;
    const uint32_t s = (b & 0x80u) << 8, e = (b >> 3) & 0xfu, m = b & 0x7u;
    uint32_t h;
    if ((b & 0x7fu) == 0x7fu) h = s | 0x7e00u;
    else if (e != 0) h = s | ((e + 8u) << 10) | (m << 7);
    else h = s | __half_as_ushort(__float2half_rn(static_cast<float>(m) * 0.001953125f));
    out |= h << (16 * i);
  }
  return out;
#else
  uint32_t h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h) : "h"(static_cast<uint16_t>(x & 0xffffu)));
  return h;
#endif
}

// Four fp8 values (bytes of x, lowest address first) -> four fp16 values, exact: (lo, hi) half2 words.
// e5m2 is the top byte of an fp16 (same exponent bias and width: every value, subnormals, Inf and NaN
// included, is that fp16), so a byte permute places it; e4m3fn by e4m3x2_to_half2.
template <bool E5>
__device__ __forceinline__ void fp8x4_to_half2x2(uint32_t x, uint32_t& lo, uint32_t& hi) {
  if constexpr (E5) {
    lo = __byte_perm(x, 0u, 0x1404);  // bytes (0, x0, 0, x1)
    hi = __byte_perm(x, 0u, 0x3424);  // bytes (0, x2, 0, x3)
  } else {
    lo = e4m3x2_to_half2(x & 0xffffu);
    hi = e4m3x2_to_half2(x >> 16);
  }
}
// Two fp16 values -> two of T (fp16: as they are; bf16: through float, exact for fp8-born values).
template <class T> __device__ __forceinline__ uint32_t half2_to(uint32_t h);
template <> __device__ __forceinline__ uint32_t half2_to<__half>(uint32_t h) { return h; }
template <> __device__ __forceinline__ uint32_t half2_to<__nv_bfloat16>(uint32_t h) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  const __nv_bfloat162 b = __float22bfloat162_rn(f);
  return *reinterpret_cast<const uint32_t*>(&b);
}
// Eight fp8 values (8 bytes) -> eight of T (16 bytes).
template <class T, bool E5>
__device__ __forceinline__ uint4 fp8x8_to(uint2 x) {
  uint32_t a, b, c, d;
  fp8x4_to_half2x2<E5>(x.x, a, b);
  fp8x4_to_half2x2<E5>(x.y, c, d);
  return make_uint4(half2_to<T>(a), half2_to<T>(b), half2_to<T>(c), half2_to<T>(d));
}
// One fp8 value (the SIMT kernel's loads) -> float, exact (e5: e5m2, else e4m3fn).
__device__ __forceinline__ float fp8_to_float(uint8_t x, bool e5) {
  uint32_t h;
  if (e5) h = static_cast<uint32_t>(x) << 8;
  else h = e4m3x2_to_half2(x);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xffffu)));
}

// Per-row bookkeeping of the CTA's current row tile, in shared memory.
template <int kTileRows>
struct RowInfo {
  int32_t vis[kTileRows];   // visible tokens of the chunk (0: padding row or chunk past its limit)
  int32_t lo[kTileRows];    // first visible token of the chunk (sliding window; 0 without, or if vis 0)
  int64_t qoff[kTileRows];  // element offset of the row's q vector (row * stride + head * stride)
  int32_t out_row[kTileRows];  // >= 0: write straight to out/lse (the row's only partial)
  int32_t slot[kTileRows];
  int32_t head[kTileRows];
  uint32_t kv_chunks;  // K+V 16-byte chunk pairs copied (only counted when p.kv_bytes_loaded is set)
};

// F8: fp8 caches. The K/V tiles (q's dtype) are double-buffered by the cp.async pipeline; with F8 the
// pipeline fills a double-buffered staging area of fp8 bytes (BN x D per K or V) instead, converted
// into one stage of K/V tiles per block.
template <class T, int D, int WARPS = 4, bool F8 = false>
struct MmaCfg {
  static constexpr int kTileRows = WARPS * 16;  // packed rows per CTA pass
  static constexpr int kThreads = WARPS * 32;
  static constexpr int BN = D >= 256 ? 32 : 64;   // tokens per pipelined KV block
  static constexpr int LD = D + 8;                 // smem row stride (elements): conflict-free ldmatrix
  static constexpr int kQ = kTileRows * LD;
  static constexpr int kKV = BN * LD;
  static constexpr int kStages = F8 ? 1 : 2;       // K/V tile stages (q's dtype)
  static constexpr int kKV8 = F8 ? BN * D : 0;     // bytes of one fp8 staging tile (rows of D bytes)
  static constexpr size_t smem_bytes =
      (kQ + 2 * kStages * kKV) * sizeof(T) + 4 * kKV8 + sizeof(RowInfo<kTileRows>);
};

// Soft-cap in the base-2 units of the online softmax. u = 2 log2(e) s0 / c for the scaled score
// s0 = sm_scale * q.k (the factor is folded into one multiply of the raw q.k); returns log2(e) * c *
// tanh(s0 / c), i.e. the capped score s = c tanh(s0 / c) times log2(e) like every other score here.
//   tanh(x) = 1 - 2 / (exp(2x) + 1) = 1 - 2 / (exp2(u) + 1)       (x = s0 / c, exp(2x) = exp2(u))
// ex2 and the fast reciprocal are accurate to a few ulp of their results, so the capped score is
// accurate to ~1e-7 * c in absolute terms (what the softmax sees; near x = 0 the cancellation costs
// relative accuracy of tanh itself, not absolute accuracy of the score), and it saturates exactly to
// +-c (exp2 -> inf: the quotient is 0; exp2 -> 0: 1 - 2). NaN policy (docs/errors.md, the reference:
// it looks at the raw score): the tanh would map an infinite raw score to a finite +-c, so the term
// (u - u), 0 for a finite u and NaN for a NaN or +-Inf one, makes the capped score NaN exactly when the
// raw one is not finite (the row then turns NaN as it does without the cap).
__device__ __forceinline__ float softcap_log2(float u, float c_log2) {
  return c_log2 - __fdividef(2.f * c_log2, exp2f(u) + 1.f) + (u - u);
}

// Adds each thread's count of K+V bytes it loaded to the optional counter (one atomic per warp). Every
// lane of the warp must call it (no lane may have returned).
__device__ __forceinline__ void add_loaded_bytes(void* counter, unsigned long long mine) {
  if (counter == nullptr) return;
  for (int off = 16; off > 0; off /= 2) mine += __shfl_xor_sync(0xffffffffu, mine, off);
  if (threadIdx.x % 32 == 0 && mine != 0) atomicAdd(static_cast<unsigned long long*>(counter), mine);
}

// F8: the fp8 staging tiles k8 / v8 of one KV block (BN rows of D bytes) converted into the K/V tiles
// k / v of q's dtype (rows of LD elements), 8 elements (one 8-byte read, one 16-byte write) at a time.
template <class T, bool E5, int D, int LD, int BN, int NTHREADS>
__device__ __forceinline__ void convert_kv_tiles(const uint8_t* k8, const uint8_t* v8, T* k, T* v, int tid) {
  constexpr int U = D / 8;  // 8-element units per row
  static_assert(BN * U % NTHREADS == 0, "every thread converts the same number of units");
#pragma unroll 2
  for (int i = 0; i < BN * U / NTHREADS; ++i) {
    const int u = tid + i * NTHREADS;
    const int r = u / U, col = (u % U) * 8;
    const uint2 xk = *reinterpret_cast<const uint2*>(k8 + r * D + col);
    const uint2 xv = *reinterpret_cast<const uint2*>(v8 + r * D + col);
    *reinterpret_cast<uint4*>(k + r * LD + col) = fp8x8_to<T, E5>(xk);
    *reinterpret_cast<uint4*>(v + r * LD + col) = fp8x8_to<T, E5>(xv);
  }
}

// VAR: the window / soft-cap kernel (p.reader_lo may be null, p.softcap 0); VAR = false is the plain one.
// F8: fp8 caches (p.kv_dtype e4m3fn / e5m2, scales p.k_scale / p.v_scale); F8 = false: q's dtype.
template <class T, int D, int WARPS, bool VAR, bool F8>
__global__ void __launch_bounds__(WARPS * 32, 1) tree_attention_mma_kernel(const TreeAttentionParams p) {
  using Cfg = MmaCfg<T, D, WARPS, F8>;
  using KV = std::conditional_t<F8, uint8_t, T>;  // cache element
  constexpr int kTileRows = Cfg::kTileRows, kThreads = Cfg::kThreads;
  constexpr int BN = Cfg::BN, LD = Cfg::LD;
  constexpr int NT = BN / 8;   // n-tiles of S per warp
  constexpr int DT = D / 8;    // n-tiles of O per warp
  constexpr int CPR = D / 8;   // 16-byte chunks per row of Q
  constexpr int EPC = 16 / static_cast<int>(sizeof(KV));  // cache elements per 16-byte copy
  constexpr int KCPR = D / EPC;                           // 16-byte chunks per K/V row of the cache
  constexpr int KLD = F8 ? D : LD;                        // row stride of the cp.async destination
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Cfg::kQ;                      // kStages stages (2; F8: 1)
  T* sV = sK + Cfg::kStages * Cfg::kKV;      // kStages stages
  // F8: fp8 staging, K stage 0, K stage 1, V stage 0, V stage 1 (kKV8 bytes each); else empty
  uint8_t* s8 = reinterpret_cast<uint8_t*>(sV + Cfg::kStages * Cfg::kKV);
  RowInfo<kTileRows>* info = reinterpret_cast<RowInfo<kTileRows>*>(s8 + 4 * Cfg::kKV8);

  const int item = blockIdx.x, kh = blockIdx.y;
  const int nr = p.item_num_readers[item];
  if (nr == 0) return;  // capacity padding
  const int group = gqa_group(p.num_qo_heads, p.num_kv_heads);
  const int M = nr * group;
  const int32_t node = p.item_node[item], kv_start = p.item_kv_start[item], len = p.item_kv_len[item];
  const int32_t r0 = p.item_reader_start[item], slot0 = p.item_partial_start[item];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const T* q = static_cast<const T*>(p.q);
  const KV* kc = static_cast<const KV*>(p.k_cache);
  const KV* vc = static_cast<const KV*>(p.v_cache);
  // F8: the KV head's k_scale folds into the score scale (raw q.k8 times it is sm_scale q.k)
  float sm_scale = p.sm_scale;
  if constexpr (F8) sm_scale *= p.k_scale[p.kv_scale_per_head ? kh : 0];
  const float scale_log2 = sm_scale * kLog2e;
  // Soft-cap (VAR only): raw q.k times cap_u gives softcap_log2's u; cap_l2 = c log2(e).
  const bool cap_on = VAR && p.softcap > 0.f;
  const float cap_u = cap_on ? 2.f * kLog2e * sm_scale / p.softcap : 0.f;
  const float cap_l2 = p.softcap * kLog2e;
  if (tid == 0) info->kv_chunks = 0;  // the KV byte counter, counted at the loads (no register cost)

  for (int m0 = 0; m0 < M; m0 += kTileRows) {
    __syncthreads();  // previous tile's readers of info/sQ are done
    if (tid < kTileRows) {
      const int m = m0 + tid;
      int vis = 0, lo = 0, orow = -1, slot = 0, head = 0;
      int64_t qoff = 0;
      if (m < M) {
        const int rd = r0 + packed_reader(m, group);
        const int row = p.reader_row[rd];
        head = packed_head(m, group, kh);
        vis = visible_in_chunk(p.reader_limit[rd], kv_start, len);
        if constexpr (VAR) {  // the row sees tokens [lo, vis) of the chunk: nothing when lo >= vis
          lo = window_lo_in_chunk(p.reader_lo, rd, kv_start);
          if (lo >= vis) vis = lo = 0;
        }
        qoff = row * p.q_stride_row + head * p.q_stride_head;
        slot = slot0 + packed_reader(m, group);
        if (p.row_partial_indptr[row + 1] - p.row_partial_indptr[row] == 1) orow = row;
      }
      info->vis[tid] = vis; info->lo[tid] = lo; info->qoff[tid] = qoff; info->out_row[tid] = orow;
      info->slot[tid] = slot; info->head[tid] = head;
    }
    __syncthreads();
    // The tile's rows see tokens [tile_lo, max_vis) of the chunk at most: its KV blocks start at tile_lo
    // (the smallest lo of its rows that see anything; 0 without a window), so the tokens below it are
    // neither loaded nor counted. Block b holds tokens tile_lo + b * BN ... tile_lo + b * BN + BN - 1.
    int max_vis = 0, tile_lo = 0;
    if constexpr (VAR) {
      tile_lo = INT32_MAX;
      for (int i = 0; i < kTileRows; ++i) {
        const int v = info->vis[i];
        max_vis = max(max_vis, v);
        if (v > 0) tile_lo = min(tile_lo, info->lo[i]);
      }
      tile_lo = min(tile_lo, max_vis);
    } else {
      for (int i = 0; i < kTileRows; ++i) max_vis = max(max_vis, info->vis[i]);
    }
    const int nblocks = (max_vis - tile_lo + BN - 1) / BN;

    // Q tile (rows past M are zero-filled).
    for (int c = tid; c < kTileRows * CPR; c += kThreads) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const bool ok = m0 + r < M;
      cp_async16(sQ + r * LD + col, q + (ok ? info->qoff[r] : 0) + col, ok);
    }
    // Block blk's K/V into pipeline stage `stage`: the K/V tiles, or (F8) the fp8 staging tiles.
    auto load_kv = [&](int blk, int stage) {
      KV* dk;
      KV* dv;
      if constexpr (F8) {
        dk = s8 + stage * Cfg::kKV8;
        dv = s8 + (2 + stage) * Cfg::kKV8;
      } else {
        dk = sK + stage * Cfg::kKV;
        dv = sV + stage * Cfg::kKV;
      }
      for (int c = tid; c < BN * KCPR; c += kThreads) {
        const int r = c / KCPR, col = (c % KCPR) * EPC;
        const int t = tile_lo + blk * BN + r;  // token within the chunk
        const bool ok = t < max_vis;
        const int tok = kv_start + (ok ? t : 0);
        const int64_t ko = cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                        p.k_stride_page, p.k_stride_slot, p.k_stride_head);
        const int64_t vo = cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                        p.v_stride_page, p.v_stride_slot, p.v_stride_head);
        cp_async16(dk + r * KLD + col, kc + ko + col, ok);
        cp_async16(dv + r * KLD + col, vc + vo + col, ok);
        if (p.kv_bytes_loaded != nullptr && ok) atomicAdd(&info->kv_chunks, 1u);  // 16 B of K + 16 of V
      }
    };
    if (nblocks > 0) load_kv(0, 0);
    cp_async_commit();

    const int wr = warp * 16;  // this warp's first row in the tile
    const int vis_lo = info->vis[wr + g], vis_hi = info->vis[wr + g + 8];
    // VAR: the rows' window starts; with span = vis - lo a token t is visible iff 0 <= t - lo < span,
    // one unsigned compare of the row-relative index (the plain kernel's t < vis costs the same).
    const int lo_lo = VAR ? info->lo[wr + g] : 0, lo_hi = VAR ? info->lo[wr + g + 8] : 0;
    float o[DT][4];
#pragma unroll
    for (int j = 0; j < DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};

    for (int b = 0; b < nblocks; ++b) {
      if (b + 1 < nblocks) {
        load_kv(b + 1, (b + 1) & 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      if constexpr (F8) {  // staging stage b & 1 -> the K/V tiles (exact; zero-filled rows stay 0)
        const uint8_t* k8 = s8 + (b & 1) * Cfg::kKV8;
        const uint8_t* v8 = s8 + (2 + (b & 1)) * Cfg::kKV8;
        if (p.kv_dtype == DType::kFloat8E5M2)
          convert_kv_tiles<T, true, D, LD, BN, kThreads>(k8, v8, sK, sV, tid);
        else
          convert_kv_tiles<T, false, D, LD, BN, kThreads>(k8, v8, sK, sV, tid);
        __syncthreads();
      }
      const T* k_s = sK + (F8 ? 0 : (b & 1) * Cfg::kKV);
      const T* v_s = sV + (F8 ? 0 : (b & 1) * Cfg::kKV);
      if (wr < M - m0) {
        // S = Q K^T for 16 rows x BN tokens.
        float s[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t a[4];
          ldmatrix_x4(a, sQ + (wr + lane % 16) * LD + kk * 16 + (lane / 16) * 8);
#pragma unroll
          for (int j = 0; j < NT; j += 2) {
            uint32_t bk[4];
            const int jm = lane / 8, rr = lane % 8;
            ldmatrix_x4(bk, k_s + (j * 8 + rr + (jm / 2) * 8) * LD + kk * 16 + (jm % 2) * 8);
            mma16816<T>(s[j], a, bk);
            mma16816<T>(s[j + 1], a, bk + 2);
          }
        }
        // Mask, scale to log2 domain, online softmax update (rows g and g + 8 of the warp).
        float bmax[2] = {-INFINITY, -INFINITY};
        if constexpr (VAR) {
          // Scaled (and soft-capped) scores first, then the mask: the cap applies to every score and
          // the masked ones become -inf whatever they held.
          if (cap_on) {
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) s[j][e] = softcap_log2(s[j][e] * cap_u, cap_l2);
          } else {
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2;
          }
          // Row-relative index of the block's first token for rows g (h = 0) and g + 8 (h = 1).
          const int rel0 = tile_lo + b * BN - lo_lo, rel1 = tile_lo + b * BN - lo_hi;
          const unsigned span0 = vis_lo - lo_lo, span1 = vis_hi - lo_hi;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int c = j * 8 + t4 * 2 + (e & 1);
              const bool ok = e < 2 ? static_cast<unsigned>(rel0 + c) < span0
                                    : static_cast<unsigned>(rel1 + c) < span1;
              s[j][e] = ok ? s[j][e] : -INFINITY;
              bmax[e / 2] = fmaxf(bmax[e / 2], s[j][e]);
            }
          }
        } else {
#pragma unroll
          for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int t = b * BN + j * 8 + t4 * 2 + (e & 1);
              const bool ok = t < (e < 2 ? vis_lo : vis_hi);
              s[j][e] = ok ? s[j][e] * scale_log2 : -INFINITY;
              bmax[e / 2] = fmaxf(bmax[e / 2], s[j][e]);
            }
          }
        }
        float alpha[2], mnew[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          bmax[h] = fmaxf(bmax[h], __shfl_xor_sync(0xffffffffu, bmax[h], 1));
          bmax[h] = fmaxf(bmax[h], __shfl_xor_sync(0xffffffffu, bmax[h], 2));
          mnew[h] = fmaxf(mrow[h], bmax[h]);
          // A row that has seen nothing yet keeps m = -inf: use 0 as the reference so exp2 gives 0.
          const float ref = mnew[h] == -INFINITY ? 0.f : mnew[h];
          alpha[h] = exp2f(mrow[h] - ref);
          mrow[h] = mnew[h];
          mnew[h] = ref;
          lrow[h] *= alpha[h];
        }
#pragma unroll
        for (int j = 0; j < DT; ++j) {
          o[j][0] *= alpha[0]; o[j][1] *= alpha[0];
          o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
        }
        uint32_t pa[NT / 2][4];  // P as A fragments (k = tokens)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          float e0 = exp2f(s[j][0] - mnew[0]), e1 = exp2f(s[j][1] - mnew[0]);
          float e2 = exp2f(s[j][2] - mnew[1]), e3 = exp2f(s[j][3] - mnew[1]);
          lrow[0] += e0 + e1;
          lrow[1] += e2 + e3;
          pa[j / 2][(j % 2) * 2 + 0] = Pack2<T>::pack(e0, e1);
          pa[j / 2][(j % 2) * 2 + 1] = Pack2<T>::pack(e2, e3);
        }
        // O += P V: V^T fragments by ldmatrix.trans from the [token][d] tile.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
          for (int j = 0; j < DT; j += 2) {
            uint32_t bv[4];
            const int jm = lane / 8, rr = lane % 8;
            ldmatrix_x4_trans(bv, v_s + (kk * 16 + rr + (jm % 2) * 8) * LD + j * 8 + (jm / 2) * 8);
            mma16816<T>(o[j], pa[kk], bv);
            mma16816<T>(o[j + 1], pa[kk], bv + 2);
          }
        }
      }
      // Stage b & 1 is refilled by the next iteration's prefetch. F8: that prefetch fills the staging
      // tiles, read by this iteration's conversion before the barrier above, and the next conversion
      // writes the K/V tiles after the next iteration's first barrier: no barrier needed here.
      if constexpr (!F8) __syncthreads();
    }
    cp_async_wait<0>();

    // Epilogue: finish the row sums across the quad, normalise, write out or the partial slot.
    if (wr < M - m0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 1);
        lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 2);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wr + g + 8 * h;
        if (m0 + r >= M) continue;
        // A row that saw nothing has l = 0 exactly (out 0, lse -inf). A NaN l (a NaN or +-Inf score, or
        // a NaN in q) counts as seen, so that the lse is NaN too (NaN policy, docs/errors.md): an lse of
        // -inf would mark a partial state empty and the merge would drop its NaN.
        const bool seen = lrow[h] != 0.f;
        float inv = seen ? 1.f / lrow[h] : 0.f;
        if constexpr (F8) inv *= p.v_scale[p.kv_scale_per_head ? kh : 0];  // out = v_scale (P v8) / l
        const float lse = seen ? (mrow[h] + log2f(lrow[h])) * kLn2 : -INFINITY;
        const int orow = info->out_row[r], head = info->head[r];
        if (orow >= 0) {
          T* dst = static_cast<T*>(p.out) + partial_out_offset(orow, head, p.num_qo_heads, D);
#pragma unroll
          for (int j = 0; j < DT; ++j) {
            typename Pack2<T>::T2 v2;
            v2.x = Pack2<T>::from_float(o[j][2 * h] * inv);
            v2.y = Pack2<T>::from_float(o[j][2 * h + 1] * inv);
            *reinterpret_cast<typename Pack2<T>::T2*>(dst + j * 8 + t4 * 2) = v2;
          }
          if (t4 == 0) p.lse[partial_lse_offset(orow, head, p.num_qo_heads)] = lse;
        } else {
          const int slot = info->slot[r];
          float* dst = p.partial_out + partial_out_offset(slot, head, p.num_qo_heads, D);
#pragma unroll
          for (int j = 0; j < DT; ++j)
            *reinterpret_cast<float2*>(dst + j * 8 + t4 * 2) =
                make_float2(o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
          if (t4 == 0) p.partial_lse[partial_lse_offset(slot, head, p.num_qo_heads)] = lse;
        }
      }
    }
  }
  if (p.kv_bytes_loaded != nullptr) {
    __syncthreads();
    if (tid == 0 && info->kv_chunks != 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.kv_bytes_loaded), 32ull * info->kv_chunks);
  }
}

// ------------------------------------------------------------------------------------------ SIMT path
template <class T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr int kSimtMaxD = 256;
constexpr int kSimtPer = kSimtMaxD / 32;

// A cache element as float: T, or an fp8 byte (uint8_t) of format e5m2 (e5) / e4m3fn, exact.
template <class KV> __device__ __forceinline__ float kv_to_f(KV x, bool) { return to_f(x); }
template <> __device__ __forceinline__ float kv_to_f<uint8_t>(uint8_t x, bool e5) { return fp8_to_float(x, e5); }

// One warp per packed row (rows m = warp, warp + 4, ...); lane holds dims lane, lane + 32, ...
// VAR: the window / soft-cap kernel (p.reader_lo may be null, p.softcap 0): a row walks tokens [lo, vis).
// F8: fp8 caches (p.kv_dtype, p.k_scale / p.v_scale; folded into q's scale and the output's 1 / l).
template <class T, bool VAR, bool F8>
__global__ void __launch_bounds__(kThreads, 8) tree_attention_simt_kernel(const TreeAttentionParams p) {
  const int item = blockIdx.x, kh = blockIdx.y;
  const int nr = p.item_num_readers[item];
  if (nr == 0) return;
  const int group = gqa_group(p.num_qo_heads, p.num_kv_heads);
  const int M = nr * group, D = p.head_dim;
  const int32_t node = p.item_node[item], kv_start = p.item_kv_start[item], len = p.item_kv_len[item];
  const int32_t r0 = p.item_reader_start[item];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  using KV = std::conditional_t<F8, uint8_t, T>;  // cache element
  const T* q = static_cast<const T*>(p.q);
  const KV* kc = static_cast<const KV*>(p.k_cache);
  const KV* vc = static_cast<const KV*>(p.v_cache);
  const bool e5 = F8 && p.kv_dtype == DType::kFloat8E5M2;
  // KV byte counter, at the loads: each lane loads its dims lane, lane + 32, ... (< D) of K and V per token
  int my_dims = 0;
  for (int i = 0; i < kSimtPer; ++i) my_dims += lane + 32 * i < D ? 1 : 0;
  unsigned long long loaded = 0;
  // q is pre-scaled so that a dot product is the score in base-2 units (sm_scale * log2(e) folded in),
  // or, soft-capped, softcap_log2's argument u = 2 log2(e) sm_scale q.k / c. F8: sm_scale times the KV
  // head's k_scale (q.k8 times it is sm_scale q.k); the output's 1 / l times its v_scale.
  const bool cap_on = VAR && p.softcap > 0.f;
  float qscale = cap_on ? 2.f * kLog2e * p.sm_scale / p.softcap : p.sm_scale * kLog2e;
  if constexpr (F8) qscale *= p.k_scale[p.kv_scale_per_head ? kh : 0];
  const float cap_l2 = p.softcap * kLog2e;
  for (int m = warp; m < M; m += kWarps) {
    const int rd = r0 + packed_reader(m, group);
    const int row = p.reader_row[rd];
    const int head = packed_head(m, group, kh);
    const int vis = visible_in_chunk(p.reader_limit[rd], kv_start, len);
    const int lo = VAR ? min(window_lo_in_chunk(p.reader_lo, rd, kv_start), vis) : 0;  // sees [lo, vis)
    float qv[kSimtPer], acc[kSimtPer];
#pragma unroll
    for (int i = 0; i < kSimtPer; ++i) {
      const int d = lane + 32 * i;
      qv[i] = d < D ? to_f(q[row * p.q_stride_row + head * p.q_stride_head + d]) * qscale : 0.f;
      acc[i] = 0.f;
    }
    float mx = -INFINITY, l = 0.f;
    for (int t = lo; t < vis; ++t) {
      const int tok = kv_start + t;
      const int64_t ko = cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                      p.k_stride_page, p.k_stride_slot, p.k_stride_head);
      const int64_t vo = cache_offset(p.node_page_indptr, p.node_page_indices, node, tok, p.page_size, kh,
                                      p.v_stride_page, p.v_stride_slot, p.v_stride_head);
      float s = 0.f;
  #pragma unroll
    for (int i = 0; i < kSimtPer; ++i) {
        const int d = lane + 32 * i;
        if (d < D) s += qv[i] * kv_to_f(kc[ko + d], e5);
      }
      for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (cap_on) s = softcap_log2(s, cap_l2);
      const float mn = fmaxf(mx, s);
      const float alpha = exp2f(mx - mn), e = exp2f(s - mn);
      l = l * alpha + e;
  #pragma unroll
    for (int i = 0; i < kSimtPer; ++i) {
        const int d = lane + 32 * i;
        acc[i] = acc[i] * alpha + (d < D ? e * kv_to_f(vc[vo + d], e5) : 0.f);
      }
      mx = mn;
    }
    loaded += static_cast<unsigned long long>(vis - lo) * 2 * my_dims * sizeof(KV);
    const bool seen = vis > lo;
    float inv = seen ? 1.f / l : 0.f;
    if constexpr (F8) inv *= p.v_scale[p.kv_scale_per_head ? kh : 0];
    const float lse = seen ? (mx + log2f(l)) * kLn2 : -INFINITY;
    const bool direct = p.row_partial_indptr[row + 1] - p.row_partial_indptr[row] == 1;
    const int slot = p.item_partial_start[item] + packed_reader(m, group);
#pragma unroll
    for (int i = 0; i < kSimtPer; ++i) {
      const int d = lane + 32 * i;
      if (d >= D) continue;
      if (direct)
        static_cast<T*>(p.out)[partial_out_offset(row, head, p.num_qo_heads, D) + d] = from_f<T>(acc[i] * inv);
      else
        p.partial_out[partial_out_offset(slot, head, p.num_qo_heads, D) + d] = acc[i] * inv;
    }
    if (lane == 0) {
      if (direct) p.lse[partial_lse_offset(row, head, p.num_qo_heads)] = lse;
      else p.partial_lse[partial_lse_offset(slot, head, p.num_qo_heads)] = lse;
    }
  }
  add_loaded_bytes(p.kv_bytes_loaded, loaded);
}

// The window / soft-cap kernels (VAR) run only when the call has either: the plain ones stay as they were.
bool has_variant(const TreeAttentionParams& p) { return p.reader_lo != nullptr || p.softcap > 0.f; }

template <class T, int D, int WARPS, bool VAR, bool F8>
cudaError_t launch_mma_v(const TreeAttentionParams& p, cudaStream_t stream) {
  const size_t smem = MmaCfg<T, D, WARPS, F8>::smem_bytes;
  cudaError_t e = cudaFuncSetAttribute(tree_attention_mma_kernel<T, D, WARPS, VAR, F8>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  dim3 grid(p.num_items, p.num_kv_heads);
  tree_attention_mma_kernel<T, D, WARPS, VAR, F8><<<grid, WARPS * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <class T, int D, int WARPS, bool F8>
cudaError_t launch_mma(const TreeAttentionParams& p, cudaStream_t stream) {
  return has_variant(p) ? launch_mma_v<T, D, WARPS, true, F8>(p, stream)
                        : launch_mma_v<T, D, WARPS, false, F8>(p, stream);
}

// The wide (128-row) tile when an item may hold more than 64 packed rows (the plan's rows_per_tile x
// the GQA group), so that its chunk is loaded once for all of them; head_dim 256 keeps 64 rows.
bool wide_tile(const TreeAttentionParams& p) {
  return p.head_dim <= 128 &&
         static_cast<int64_t>(p.max_readers) * gqa_group(p.num_qo_heads, p.num_kv_heads) > 4 * 16;
}

template <class T, bool F8>
cudaError_t launch_mma_d(const TreeAttentionParams& p, cudaStream_t stream) {
  const bool wide = wide_tile(p);
  switch (p.head_dim) {
    case 64: return wide ? launch_mma<T, 64, kWideWarps, F8>(p, stream) : launch_mma<T, 64, 4, F8>(p, stream);
    case 128: return wide ? launch_mma<T, 128, kWideWarps, F8>(p, stream) : launch_mma<T, 128, 4, F8>(p, stream);
    default: return launch_mma<T, 256, 4, F8>(p, stream);
  }
}

template <class T, bool F8>
cudaError_t launch_simt(const TreeAttentionParams& p, cudaStream_t stream) {
  dim3 grid(p.num_items, p.num_kv_heads);
  if (has_variant(p))
    tree_attention_simt_kernel<T, true, F8><<<grid, kThreads, 0, stream>>>(p);
  else
    tree_attention_simt_kernel<T, false, F8><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// 16-byte aligned base pointer and strides (in elements of elem_bytes) that are multiples of 16 bytes.
bool aligned16(const void* ptr, int elem_bytes, int64_t a, int64_t b, int64_t c) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && a * elem_bytes % 16 == 0 &&
         b * elem_bytes % 16 == 0 && c * elem_bytes % 16 == 0;
}

bool kv_is_fp8(const TreeAttentionParams& p) { return dtype_is_fp8(p.kv_dtype); }

}  // namespace

bool tree_attention_uses_mma(const TreeAttentionParams& p) {
  const bool dims = p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256;
  const int kv_bytes = kv_is_fp8(p) ? 1 : dtype_size(p.dtype);
  return p.dtype != DType::kFloat32 && dims &&
         aligned16(p.q, dtype_size(p.dtype), p.q_stride_row, p.q_stride_head, 0) &&
         aligned16(p.k_cache, kv_bytes, p.k_stride_page, p.k_stride_slot, p.k_stride_head) &&
         aligned16(p.v_cache, kv_bytes, p.v_stride_page, p.v_stride_slot, p.v_stride_head);
}

size_t tree_attention_smem_bytes(DType dtype, int head_dim, bool fp8_kv) {
  if (dtype == DType::kFloat32) return 0;
  switch (head_dim) {
    // the largest configuration (the wide 128-row tile for head_dim 64/128)
    case 64: return fp8_kv ? MmaCfg<__half, 64, kWideWarps, true>::smem_bytes
                           : MmaCfg<__half, 64, kWideWarps>::smem_bytes;
    case 128: return fp8_kv ? MmaCfg<__half, 128, kWideWarps, true>::smem_bytes
                            : MmaCfg<__half, 128, kWideWarps>::smem_bytes;
    case 256: return fp8_kv ? MmaCfg<__half, 256, 4, true>::smem_bytes : MmaCfg<__half, 256, 4>::smem_bytes;
    default: return 0;
  }
}

cudaError_t tree_attention(const TreeAttentionParams& p, cudaStream_t stream) {
  if (p.num_items == 0 || p.num_kv_heads == 0) return cudaSuccess;
  if (p.head_dim > kSimtMaxD) return cudaErrorInvalidValue;
  const bool f8 = kv_is_fp8(p);
  // fp8 caches: fp16 / bf16 q and both scales (params.h)
  if (f8 && (p.dtype == DType::kFloat32 || p.k_scale == nullptr || p.v_scale == nullptr))
    return cudaErrorInvalidValue;
  if (tree_attention_uses_mma(p)) {
    if (p.dtype == DType::kFloat16)
      return f8 ? launch_mma_d<__half, true>(p, stream) : launch_mma_d<__half, false>(p, stream);
    return f8 ? launch_mma_d<__nv_bfloat16, true>(p, stream) : launch_mma_d<__nv_bfloat16, false>(p, stream);
  }
  switch (p.dtype) {
    case DType::kFloat16:
      return f8 ? launch_simt<__half, true>(p, stream) : launch_simt<__half, false>(p, stream);
    case DType::kBFloat16:
      return f8 ? launch_simt<__nv_bfloat16, true>(p, stream) : launch_simt<__nv_bfloat16, false>(p, stream);
    default: return launch_simt<float, false>(p, stream);
  }
}

}  // namespace multiverse::cuda
