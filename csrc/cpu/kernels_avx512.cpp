// AVX-512 (F, VL, BW, DQ) instantiation of the CPU tree-attention micro-kernels
// (tree_attention_impl.h): 16-float zmm vectors, register tiles sized for 32 zmm registers. Run only
// when the CPU (and OS) support AVX-512 F/VL/BW/DQ (tree_attention.cpp dispatches by cpuid).
#include "tree_attention_common.h"

#if defined(MULTIVERSE_X86_ISAS)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside avx512fintrin.h
#endif
#define MV_LEVEL 2
#define MV_TASK_FN tree_attention_task_avx512
#define MV_PEAK_FN fma_loop_avx512
#include "tree_attention_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
