// Baseline instantiation of the CPU tree-attention micro-kernels (tree_attention_impl.h), compiled for
// the build's default target (SSE2 on x86-64; any CPU elsewhere): 4-float vectors.
#include "tree_attention_common.h"

#define MV_LEVEL 0
#define MV_TASK_FN tree_attention_task_baseline
#define MV_PEAK_FN fma_loop_baseline
#include "tree_attention_impl.h"
