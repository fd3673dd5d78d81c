// Internal interface between the CPU tree-attention dispatcher (tree_attention.cpp) and its per-ISA
// micro-kernel translation units (tree_attention_{avx512,avx2,baseline}.cpp, all built from
// tree_attention_impl.h with a different target). Only plain types cross this boundary: the ISA units
// use no std containers, so no inline function compiled for a wider ISA can be merged by the linker
// into code that runs on a narrower CPU.
#pragma once

#include <cstdint>

#include "multiverse/params.h"

namespace multiverse::cpu {

// Per-thread buffers of one task (work item, kv head), sized by the dispatcher (task_scratch_floats).
struct TaskScratch {
  float* kv;      // packed fp32 K then V of the chunk: 2 x [tokens_pad][dp]
  float* qt;      // [D][kRowBlock] queries of a row block, transposed, times sm_scale
  float* st;      // [kTokenBlock][kRowBlock] S^T, then P^T, of one token block
  float* o;       // [kRowBlock][dp] unnormalised output rows of the row block
  float* mx;      // [kRowBlock] running max of each row
  float* sum;     // [kRowBlock] running softmax denominator of each row
  float* alpha;   // [kRowBlock] rescale of each row's output for the current token block
  int32_t* rows;  // 4 x [rows_pad] (visible tokens, partial slot, query head, direct output row or -1), then
                  // [kRowBlock] flags: the row saw a NaN/Inf score (NaN policy)
};

// Rows of the packed (reader x GQA head) dimension processed per block, and tokens per block: the
// scores of a (row block, token block) pair are [kTokenBlock x kRowBlock] floats (24 KiB), in L1.
constexpr int kRowBlock = 128;
constexpr int kTokenBlock = 48;  // tokens loaded (and prefetched ahead) per step; a multiple of every tile
constexpr int kDimPad = 16;      // packed K/V/O rows are padded to a multiple of this (zeros)

inline int64_t round_up64(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t task_rows_pad(int64_t rows) { return round_up64(rows, 16) + 16; }
inline int64_t task_row_ints(int64_t rows) { return 4 * task_rows_pad(rows) + kRowBlock; }
inline int64_t task_tokens_pad(int64_t tokens) { return round_up64(tokens < 1 ? 1 : tokens, kTokenBlock); }

// Floats of scratch a task with `tokens` chunk tokens needs (TaskScratch order).
inline int64_t task_scratch_floats(int64_t tokens, int64_t head_dim) {
  const int64_t dp = round_up64(head_dim, kDimPad);
  return 2 * task_tokens_pad(tokens) * dp + head_dim * kRowBlock + kTokenBlock * kRowBlock + kRowBlock * dp +
         3 * kRowBlock;
}

// One task; returns the K+V bytes it loaded from the caches (counted where it loads them). The chunk of
// task (next_item, next_kh) (next_item -1: none) is prefetched while this one computes.
using TaskFn = int64_t (*)(const TreeAttentionParams& p, int32_t item, int32_t kv_head, int32_t next_item,
                           int32_t next_kh, const TaskScratch& s);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MULTIVERSE_X86_ISAS 1
int64_t tree_attention_task_avx512(const TreeAttentionParams& p, int32_t item, int32_t kh, int32_t next_item,
                                   int32_t next_kh, const TaskScratch& s);
float fma_loop_avx512(int64_t iters, int64_t* flops);
float fma_loop_avx2(int64_t iters, int64_t* flops);
int64_t tree_attention_task_avx2(const TreeAttentionParams& p, int32_t item, int32_t kh, int32_t next_item,
                                   int32_t next_kh, const TaskScratch& s);
#endif
float fma_loop_baseline(int64_t iters, int64_t* flops);
int64_t tree_attention_task_baseline(const TreeAttentionParams& p, int32_t item, int32_t kh, int32_t next_item,
                                   int32_t next_kh, const TaskScratch& s);

}  // namespace multiverse::cpu
