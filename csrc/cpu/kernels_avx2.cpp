// KERNEL UNIT (AVX2): the forward and backward CPU kernels compiled for AVX2 + FMA + F16C: 8-float ymm
// vectors, register tiles sized for 16 ymm registers. Exports kKernelsAvx2 (isa_kernels.h); run only
// when the CPU has AVX2, FMA and F16C (isa_dispatch.cpp selects it by cpuid).
#include "kernels_prelude.h"

#if defined(MULTIVERSE_X86_ISAS)
MV_TARGET_PUSH("avx2,fma,f16c")
#define MV_LEVEL 1
#define MV_ISA CpuIsa::kAvx2
#define MV_KERNELS kKernelsAvx2
#include "kernels_isa_unit.h"
MV_TARGET_POP()
#endif
