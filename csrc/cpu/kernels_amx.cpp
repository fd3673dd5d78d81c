// KERNEL UNIT (AMX): the AVX512-BF16 kernels, plus AMX tiles (tdpbf16ps, amx.h) for the forward of
// bf16 steps in tasks of at least 32 rows when the head dim is a multiple of 32: the scores
// S^T = K Q^T in row tiles of 32 rows (qk_tile_amx) and P V over the tokens every row of a row block
// sees (pv_amx; tree_attention_fwd_impl.h), and the five products of the bf16 backward (gemm_amx,
// tree_attention_bwd_impl.h). Everything else - other dtypes, the forward's other head dims and masked
// tokens - is the avx512_bf16 code. Exports kKernelsAmx (isa_kernels.h); run only when the CPU has
// AMX-TILE and AMX-BF16 and the OS granted the tile-data permission (isa_dispatch.cpp).
#include "kernels_prelude.h"

#if defined(MULTIVERSE_AMX_ISA)  // (isa_kernels.h: x86-64 and a compiler that knows AMX)
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside avx512fintrin.h
#endif
MV_TARGET_PUSH("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c,amx-tile,amx-bf16")
#define MV_LEVEL 4
#define MV_AMX_EMULATE 0
#define MV_ISA CpuIsa::kAmx
#define MV_KERNELS kKernelsAmx
#include "kernels_isa_unit.h"
MV_TARGET_POP()
#endif
