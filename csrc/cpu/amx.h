// AMX tiles (MV_LEVEL 4: kernels_amx.cpp on the hardware, kernels_amx_emulated.cpp as a software model).
// Included by kernels_isa_unit.h after simd.h; the forward's tiles (qk_tile_amx, pv_amx in
// tree_attention_fwd_impl.h) and the backward's (gemm_amx in tree_attention_bwd_impl.h) use it through
// the MV_TILE_* macros below, which take literal tile numbers (GCC's tile intrinsics stringify them into
// the instruction; so the full- and half-tile variants in those functions stay written out).
//
// The three instructions, as Intel's pseudo-code defines them (palette 1: 8 tiles, tile t configured
// as rows[t] rows of colsb[t] bytes; see kTileShape):
//   tileloadd   tmm, [base + stride]   row r of the tile = the colsb bytes at base + r * stride
//   tdpbf16ps   c, a, b                c.fp32[m][n] += sum_{k < a.colsb / 4} a.bf16[m][2k] * b.bf16[k][2n]
//                                                      + a.bf16[m][2k+1] * b.bf16[k][2n+1]
//                                      (b has a.colsb / 4 rows of bf16 pairs; bf16 denormal inputs read
//                                      as zero, fp32 results flushed to zero)
//   tilestored  [base + stride], tmm   the inverse of tileloadd
// so for scores S^T = K Q^T: a = 16 tokens x 32 head dims of K (bf16 rows), b = 16 head-dim pairs x 16
// query rows (the bf16 dot path's Q^T pairs, already in that layout), c = 16 tokens x 16 rows of S^T;
// and for O += P V: a = 16 rows x 16 (or 8) token pairs of P (the bf16 path's P^T pairs, transposed),
// b = 16 (or 8) token pairs x 16 head dims of V (its token-pair rows), c = 16 rows x 16 dims.
//
// MV_AMX_EMULATE 1 replaces the instructions by that pseudo-code on a thread's 8 software tiles, so the
// AMX path's layout logic (which bytes each tile reads and writes) runs in the normal tests on any CPU
// with AVX512-BF16 (MULTIVERSE_CPU_ISA=amx_emulated; never selected by itself). The model adds the 32
// products of one instruction to each other before adding them to c (the hardware's internal order is
// not specified), so its scores differ in the last bits from the vdpbf16ps path's: a test can tell
// which path ran.
#pragma once

#if MV_LEVEL < 4
#error "amx.h is for the AMX kernel units (MV_LEVEL 4)"
#endif

namespace multiverse::cpu {
namespace {
namespace amx {

// Tile shapes (rows, bytes per row): 0-4 full (C, A, B of 32-long dot products), 5 an A tile of 8
// pairs (16 tokens of P), 6-7 B tiles of 8 pairs (16 tokens of V).
constexpr int kTileShape[8][2] = {{16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 32}, {8, 64}, {8, 64}};

// The 64-byte LDTILECFG operand: palette 1, tile t kTileShape[t].
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

inline TileConfig full_tiles() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(kTileShape[t][0]);
    c.colsb[t] = static_cast<uint16_t>(kTileShape[t][1]);
  }
  return c;
}

#if MV_AMX_EMULATE
struct Tile {
  alignas(64) uint8_t b[16][64];
};
thread_local Tile g_tiles[8];

MV_INL float bf16_daz(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return (u & 0x7f800000u) == 0 ? 0.0f : f;  // denormal (and zero) inputs read as zero
}
MV_INL float ftz(float f) { return __builtin_fabsf(f) < 1.17549435e-38f ? 0.0f : f; }

// Only the configured rows x colsb bytes are read or written (the hardware's rule: ASan then sees
// exactly the bytes the real instructions touch).
inline void load(int t, const void* base, size_t stride) {
  for (int r = 0; r < kTileShape[t][0]; ++r)
    __builtin_memcpy(g_tiles[t].b[r], static_cast<const char*>(base) + r * stride, kTileShape[t][1]);
}
inline void store(int t, void* base, size_t stride) {
  for (int r = 0; r < kTileShape[t][0]; ++r)
    __builtin_memcpy(static_cast<char*>(base) + r * stride, g_tiles[t].b[r], kTileShape[t][1]);
}
inline void zero(int t) { __builtin_memset(g_tiles[t].b, 0, sizeof(g_tiles[t].b)); }
inline void dpbf16ps(int c, int a, int b) {
  Tile& C = g_tiles[c];
  const Tile& A = g_tiles[a];
  const Tile& B = g_tiles[b];
  const int K = kTileShape[a][1] / 4;  // pairs per row of a = rows of b (the hardware faults otherwise)
  if (K != kTileShape[b][0] || kTileShape[c][1] != kTileShape[b][1] || kTileShape[c][0] != kTileShape[a][0])
    __builtin_trap();
  for (int m = 0; m < kTileShape[c][0]; ++m)
    for (int n = 0; n < kTileShape[c][1] / 4; ++n) {
      float part = 0.0f;  // this instruction's products, then added to c (see the top of the file)
      for (int k = 0; k < K; ++k) {
        uint16_t a0, a1, b0, b1;
        __builtin_memcpy(&a0, &A.b[m][4 * k], 2);
        __builtin_memcpy(&a1, &A.b[m][4 * k + 2], 2);
        __builtin_memcpy(&b0, &B.b[k][4 * n], 2);
        __builtin_memcpy(&b1, &B.b[k][4 * n + 2], 2);
        part += bf16_daz(a0) * bf16_daz(b0) + bf16_daz(a1) * bf16_daz(b1);
      }
      float acc;
      __builtin_memcpy(&acc, &C.b[m][4 * n], 4);
      acc = ftz(acc + part);
      __builtin_memcpy(&C.b[m][4 * n], &acc, 4);
    }
}
inline void configure(TileConfig*) {}
inline void restore(const TileConfig&) {}

#define MV_TILE_LOAD(t, base, stride) amx::load(t, base, stride)
#define MV_TILE_STORE(t, base, stride) amx::store(t, base, stride)
#define MV_TILE_ZERO(t) amx::zero(t)
#define MV_TILE_DPBF16(c, a, b) amx::dpbf16ps(c, a, b)
#else
// The tile configuration is per thread, and the pool's threads may be the ones other AMX code runs on
// (oneDNN; torch's cpublas::brgemm keeps a thread's configuration loaded between its calls and reloads
// it only when it changes). So every task saves the thread's configuration (STTILECFG: all zeros when
// none is loaded), loads its own, and at its end restores the saved one, or releases the tiles when
// there was none.
inline void configure(TileConfig* saved) {
  static const TileConfig cfg = full_tiles();
  _tile_storeconfig(saved);
  _tile_loadconfig(&cfg);
}
inline void restore(const TileConfig& saved) {
  if (saved.palette != 0)
    _tile_loadconfig(&saved);
  else
    _tile_release();
}

// GCC's tile macros are asm statements that do not tell the compiler which memory they read or write:
// the empty asm with a memory clobber keeps ordinary loads and stores on the right side of them.
#define MV_TILE_BARRIER() __asm__ volatile("" ::: "memory")
#define MV_TILE_LOAD(t, base, stride) \
  do {                                \
    MV_TILE_BARRIER();                \
    _tile_loadd(t, base, stride);     \
  } while (0)
#define MV_TILE_STORE(t, base, stride) \
  do {                                 \
    _tile_stored(t, base, stride);     \
    MV_TILE_BARRIER();                 \
  } while (0)
#define MV_TILE_ZERO(t) _tile_zero(t)
#define MV_TILE_DPBF16(c, a, b) _tile_dpbf16ps(c, a, b)
#endif

}  // namespace amx
}  // namespace
}  // namespace multiverse::cpu
