// AVX2 + FMA + F16C instantiation of the CPU tree-attention micro-kernels (tree_attention_impl.h):
// 8-float ymm vectors, register tiles sized for 16 ymm registers. Run only when the CPU has AVX2, FMA
// and F16C (tree_attention.cpp dispatches by cpuid).
#include "tree_attention_common.h"

#if defined(MULTIVERSE_X86_ISAS)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define MV_LEVEL 1
#define MV_TASK_FN tree_attention_task_avx2
#define MV_PEAK_FN fma_loop_avx2
#include "tree_attention_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
