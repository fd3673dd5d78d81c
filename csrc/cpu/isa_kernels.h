// INTERFACE between the plan-driven drivers (tree_attention.cpp: forward, tree_attention_backward.cpp:
// backward), the ISA dispatcher (isa_dispatch.cpp) and the per-ISA kernel units
// (kernels_*.cpp). Each kernel unit compiles the forward and backward kernels
// (tree_attention_fwd_impl.h, tree_attention_bwd_impl.h, on the SIMD helpers of simd.h) for one target
// and exports one IsaKernels table of entry points; the dispatcher picks the table of the selected ISA
// (cpuid, capped by MULTIVERSE_CPU_ISA) for both passes.
//
// Only plain types cross this boundary: the kernel units use no std containers, so no inline function
// compiled for a wider ISA can be merged by the linker into code that runs on a narrower CPU. Scratch is
// owned and sized by the drivers (the functions below give the sizes) and handed in as raw pointers.
#pragma once

#include <cstdint>
#include <sched.h>

#include "multiverse/cpu_kernels.h"
#include "multiverse/params.h"

namespace multiverse::cpu {

// ============================================================================================ forward
// Per-thread buffers of one forward task (work item, kv head), sized by the driver (task_scratch_floats).
struct TaskScratch {
  float* kv;      // packed fp32 K then V of the chunk: 2 x [tokens_pad][dp]
  float* qt;      // [D][kRowBlock] queries of a row block, transposed, times sm_scale
  float* st;      // [kTokenBlock][kRowBlock] S^T, then P^T, of one token block
  uint32_t* p2;   // [kTokenBlock / 2][kRowBlock] P^T as bf16 token pairs (the avx512_bf16 path's P V)
  float* o;       // [kRowBlock][dp] unnormalised output rows of the row block
  float* mx;      // [kRowBlock] running max of each row
  float* sum;     // [kRowBlock] running softmax denominator of each row
  float* alpha;   // [kRowBlock] rescale of each row's output for the current token block
  float* heads;   // [kMaxTaskHeads] states of a task of several KV heads (FwdHeadsFn), each
                  // task_head_floats: its q rows, o rows, mx, sum, alpha, NaN flags
  int32_t* rows;  // 5 x [rows_pad] (visible tokens, partial slot, query head, direct output row or -1,
                  // first visible token), then
                  // [kRowBlock] flags: the row saw a NaN/Inf score (NaN policy)
};

// Rows of the packed (reader x GQA head) dimension processed per block, and tokens per block: the
// scores of a (row block, token block) pair are [kTokenBlock x kRowBlock] floats (24 KiB), in L1.
constexpr int kRowBlock = 128;
constexpr int kTokenBlock = 48;  // tokens loaded (and prefetched ahead) per step; a multiple of every tile
static_assert(kTokenBlock % 2 == 0, "token blocks start on a token pair (bf16 pair packing)");
constexpr int kDimPad = 16;      // packed K/V/O rows are padded to a multiple of this (zeros)

inline int64_t round_up64(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// Scratch arrays start on a cache line (64 bytes): vector loads and stores never straddle two lines
// (std::vector only guarantees 16 bytes; misaligned scratch cost 2-5% on the dev machine). A driver
// allocates kAlignFloats more floats than it needs and starts at align64(data).
constexpr int64_t kAlignFloats = 64 / sizeof(float);
inline float* align64(float* f) {
  return f + (-(reinterpret_cast<uintptr_t>(f) / sizeof(float)) & (kAlignFloats - 1));
}
inline int64_t task_rows_pad(int64_t rows) { return round_up64(rows, 16) + 16; }
inline int64_t task_row_ints(int64_t rows) { return 5 * task_rows_pad(rows) + kRowBlock; }
inline int64_t task_tokens_pad(int64_t tokens) { return round_up64(tokens < 1 ? 1 : tokens, kTokenBlock); }

// Floats of scratch a task with `tokens` chunk tokens needs (TaskScratch order).
// A task of several KV heads (FwdHeadsFn) has at most kHeadsRows packed rows and kMaxTaskHeads heads;
// each head's state: q rows and o rows [kHeadsRows][dp], mx / sum / alpha / NaN flags [kHeadsRows].
constexpr int kHeadsRows = 16;
constexpr int kMaxTaskHeads = 8;
inline int64_t task_head_floats(int64_t head_dim) {
  return 2 * kHeadsRows * round_up64(head_dim, kDimPad) + 4 * kHeadsRows;
}

inline int64_t task_scratch_floats(int64_t tokens, int64_t head_dim) {
  const int64_t dp = round_up64(head_dim, kDimPad);
  return 2 * task_tokens_pad(tokens) * dp + head_dim * kRowBlock + kTokenBlock * kRowBlock +
         kTokenBlock / 2 * kRowBlock + kRowBlock * dp + 3 * kRowBlock + kMaxTaskHeads * task_head_floats(head_dim);
}

// One task; returns the K+V bytes it loaded from the caches (counted where it loads them). The chunk of
// task (next_item, next_kh) (next_item -1: none) is prefetched while this one computes.
using FwdTaskFn = int64_t (*)(const TreeAttentionParams& p, int32_t item, int32_t kv_head, int32_t next_item,
                              int32_t next_kh, const TaskScratch& s);
// The ISA's register-resident FMA loop (the compute roof, cpu_fma_peak): returns a value that depends
// on every chain; *flops gets the flops done.
// A task of KV heads kh0 .. kh0 + nh - 1 of one work item (nh <= kMaxTaskHeads), for ISAs that read the
// heads of a token together (nullptr elsewhere); only for items heads_task_ok accepts.
using FwdHeadsFn = int64_t (*)(const TreeAttentionParams& p, int32_t item, int32_t kh0, int32_t nh,
                               const TaskScratch& s);
using FmaLoopFn = float (*)(int64_t iters, int64_t* flops);

// =========================================================================================== backward
// FlashAttention-2 KV blocks of the backward: a task's chunk is walked in sub-chunks of kBwdSubChunk
// tokens (K, K^T, V^T, dK, dV of one sub-chunk stay in L2), its rows in blocks of kBwdRowBlock.
constexpr int kBwdSubChunk = 256;
constexpr int kBwdRowBlock = 32;
constexpr int kBwdPad = 16;  // tokens and head dims are padded to a multiple of this (one register tile)

// Striped spin locks over driver-owned words (a lock guards every key hashing to it): the backward
// adds each row block's dQ and each sub-chunk's dK/dV into the shared outputs under them. Defined here,
// before any target pragma, so that it is compiled for the default target.
struct SpinLocks {
  int32_t* words;
  uint64_t n;
  void lock(uint64_t key) const {
    int32_t* x = words + key % n;
    int spins = 0;
    while (__atomic_exchange_n(x, 1, __ATOMIC_ACQUIRE) != 0) {
      while (__atomic_load_n(x, __ATOMIC_RELAXED) != 0) {
        if (++spins > 256) sched_yield();  // the holder may be descheduled
#if defined(__x86_64__)
        else __builtin_ia32_pause();
#endif
      }
    }
  }
  void unlock(uint64_t key) const { __atomic_store_n(words + key % n, 0, __ATOMIC_RELEASE); }
};

// Per-thread buffers of one backward task, sized by the driver (bwd_scratch_floats / bwd_scratch_ints);
// every float array starts on a 64-byte boundary.
struct BwdScratch {
  float* k;      // [Tp][Dp]  K of the sub-chunk (Tp <= kBwdSubChunk tokens, zero padded)
  float* kt;     // [Dp][Tp]  K^T
  float* vt;     // [Dp][Tp]  V^T
  float* dk;     // [Tp][Dp]  dK of the sub-chunk
  float* dv;     // [Tp][Dp]  dV of the sub-chunk
  float* q;      // [kBwdRowBlock][Dp]  sm_scale q of a row block
  float* dout;   // [kBwdRowBlock][Dp]  dO of a row block
  float* s;      // [kBwdRowBlock][Tp]  S, then P
  float* ds;     // [kBwdRowBlock][Tp]  dP, then dS
  float* dq;     // [kBwdRowBlock][Dp]  dQ of a row block (before sm_scale)
  float* vrow;   // [Dp]  one V row converted to fp32 (then transposed into vt)
  float* lse;    // [rows] of the task's active rows
  float* delta;  // [rows]
  int32_t* row, *head, *vis;  // [rows] active rows: query row, query head, visible tokens in the chunk
  int32_t* sub, *svis;        // [rows] of them, those that see the current sub-chunk; their tokens in it
  int32_t* lo, *slo;          // [rows] first visible token of each active row in the chunk / in the sub-chunk
};

inline int64_t bwd_dim_pad(int64_t head_dim) { return round_up64(head_dim, kBwdPad); }
inline int64_t bwd_align(int64_t floats) { return round_up64(floats, kAlignFloats); }
// Floats of a backward task with `rows` packed rows (BwdScratch order, each array 64-byte aligned).
inline int64_t bwd_scratch_floats(int64_t head_dim, int64_t rows) {
  const int64_t dp = bwd_dim_pad(head_dim), tp = kBwdSubChunk;
  return 5 * bwd_align(tp * dp) + 3 * bwd_align(kBwdRowBlock * dp) + 2 * bwd_align(kBwdRowBlock * tp) +
         bwd_align(dp) + 2 * bwd_align(rows);
}
inline int64_t bwd_scratch_ints(int64_t rows) { return 7 * rows; }

// delta[r, h] = rowsum(dO * O) - grad_lse for query rows [row_begin, row_end) (the first pass).
using BwdDeltaFn = void (*)(const TreeAttentionBackwardParams& p, int64_t row_begin, int64_t row_end);
// One backward task (work item, kv head): its dQ, dK, dV added into p.dq / p.dk / p.dv under the locks.
using BwdTaskFn = void (*)(const TreeAttentionBackwardParams& p, int32_t item, int32_t kv_head,
                           const BwdScratch& s, const SpinLocks& row_locks, const SpinLocks& slot_locks);

// ========================================================================================== ISA table
// The entry points one ISA build exports (kernels_isa_unit.h defines one per kernel unit).
struct IsaKernels {
  CpuIsa isa;
  FwdTaskFn fwd_task;
  FwdHeadsFn fwd_heads;  // nullptr: one KV head per task
  int32_t heads_dim_multiple;  // fwd_heads takes head_dim % this == 0 only (the unit's vector width)
  FmaLoopFn fma_loop;
  BwdDeltaFn bwd_delta;
  BwdTaskFn bwd_task;
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MULTIVERSE_X86_ISAS 1
extern const IsaKernels kKernelsAvx512;  // kernels_avx512.cpp
extern const IsaKernels kKernelsAvx512Bf16;  // kernels_avx512bf16.cpp
extern const IsaKernels kKernelsAmxEmulated;  // kernels_amx_emulated.cpp
extern const IsaKernels kKernelsAvx2;    // kernels_avx2.cpp
// The AMX unit needs a compiler (and assembler) that knows the tile instructions: GCC 11, Clang 12.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define MULTIVERSE_AMX_ISA 1
extern const IsaKernels kKernelsAmx;  // kernels_amx.cpp
#endif
#endif
extern const IsaKernels kKernelsBaseline;  // kernels_baseline.cpp

// The kernels of the selected ISA (cpu_isa_selected(): cpuid, capped by MULTIVERSE_CPU_ISA, read per
// call): the one dispatch of the forward and the backward drivers (isa_dispatch.cpp).
const IsaKernels& cpu_isa_kernels();

}  // namespace multiverse::cpu
