// KERNEL UNIT (AVX-512): the forward and backward CPU kernels compiled for AVX-512 F/VL/BW/DQ: 16-float
// zmm vectors, register tiles sized for 32 zmm registers. Exports kKernelsAvx512 (isa_kernels.h); run
// only when the CPU (and OS) support AVX-512 F/VL/BW/DQ (isa_dispatch.cpp selects it by cpuid).
#include "kernels_prelude.h"

#if defined(MULTIVERSE_X86_ISAS)
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside avx512fintrin.h
#endif
MV_TARGET_PUSH("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#define MV_LEVEL 2
#define MV_ISA CpuIsa::kAvx512
#define MV_KERNELS kKernelsAvx512
#include "kernels_isa_unit.h"
MV_TARGET_POP()
#endif
