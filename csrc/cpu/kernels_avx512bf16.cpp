// KERNEL UNIT (AVX-512 + AVX512-BF16): the AVX-512 kernels, plus the bf16 dot-product instruction
// vdpbf16ps for S^T = K Q^T of bf16 steps (two head dims per instruction; exact bf16 products summed in
// fp32). Everything else - P V, the backward, fp32 / fp16 / fp8 steps - is the AVX-512 code. Exports
// kKernelsAvx512Bf16 (isa_kernels.h); run only when the CPU has AVX512_BF16 (cpuid leaf 7 subleaf 1,
// checked by isa_dispatch.cpp) on top of what the AVX-512 unit needs.
#include "kernels_prelude.h"

#if defined(MULTIVERSE_X86_ISAS)
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside avx512fintrin.h
#endif
MV_TARGET_PUSH("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c")
#define MV_LEVEL 3
#define MV_ISA CpuIsa::kAvx512Bf16
#define MV_KERNELS kKernelsAvx512Bf16
#include "kernels_isa_unit.h"
MV_TARGET_POP()
#endif
