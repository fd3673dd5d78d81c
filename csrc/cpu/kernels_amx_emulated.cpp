// KERNEL UNIT (AMX, software model): the AMX unit (kernels_amx.cpp) with the tile instructions replaced
// by their pseudo-code on software tiles (amx.h, MV_AMX_EMULATE), compiled for AVX512-BF16. It runs
// the AMX path's layout logic on any CPU with AVX512-BF16, slowly; only MULTIVERSE_CPU_ISA=amx_emulated
// selects it (the tests do). Exports kKernelsAmxEmulated (isa_kernels.h).
#include "kernels_prelude.h"

#if defined(MULTIVERSE_X86_ISAS)
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside avx512fintrin.h
#endif
MV_TARGET_PUSH("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c")
#define MV_LEVEL 4
#define MV_AMX_EMULATE 1
#define MV_ISA CpuIsa::kAmxEmulated
#define MV_KERNELS kKernelsAmxEmulated
#include "kernels_isa_unit.h"
MV_TARGET_POP()
#endif
