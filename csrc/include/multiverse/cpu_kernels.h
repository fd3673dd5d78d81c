// CPU kernels (csrc/cpu/*.cpp). Raw pointers + params structs; no torch types.
#pragma once

#include "multiverse/params.h"

namespace multiverse::cpu {

// Kernel builds of tree_attention and tree_attention_backward, by instruction set (x86-64; elsewhere
// only kBaseline): one table of entry points per ISA, picked by csrc/cpu/isa_dispatch.cpp.
enum class CpuIsa : int32_t {
  kBaseline = 0,  // the build's default target (SSE2 on x86-64), 4-float vectors
  kAvx2 = 1,      // AVX2 + FMA + F16C, 8-float vectors, tiles for 16 ymm registers
  kAvx512 = 2,    // AVX-512 F/VL/BW/DQ, 16-float vectors, tiles for 32 zmm registers
  kAvx512Bf16 = 3,  // AVX-512 + AVX512_BF16: bf16 steps' scores and P V by vdpbf16ps (the rest as kAvx512)
  kAmx = 4,         // kAvx512Bf16 + AMX-TILE/AMX-BF16: bf16 steps' scores by tdpbf16ps tiles
  kAmxEmulated = 5, // kAmx's code on a software model of the tile instructions (CPUs with AVX512_BF16;
                    // only when MULTIVERSE_CPU_ISA=amx_emulated asks for it: tests)
};
// "baseline", "avx2", "avx512", "avx512_bf16", "amx", "amx_emulated"
const char* cpu_isa_name(CpuIsa isa);
// The widest ISA this CPU (and OS) supports, by cpuid (kAmx only once the OS granted the process the
// tile-data permission, requested here; never kAmxEmulated).
CpuIsa cpu_isa_supported();
// The ISA tree_attention and tree_attention_backward dispatch to: cpu_isa_supported(), or the variable
// MULTIVERSE_CPU_ISA=amx|avx512_bf16|avx512|avx2|baseline (read per call) forcing a lower one, or
// amx_emulated on any CPU that supports avx512_bf16. Throws std::invalid_argument for an unknown name
// or an ISA this CPU cannot run.
CpuIsa cpu_isa_selected();

// FMA rate (flop/s) of the selected ISA's micro-kernel build: min(threads, pool size) workers of the
// kernels' pool each run `iters` rounds of register-resident FMA chains. The compute roof of
// multiverse_kernels/roofline.py.
double cpu_fma_peak(int64_t iters, int64_t threads);

// Partial (out, lse) of every (work item, kv head) of the plan into p.partial_out / p.partial_lse.
// Throws std::invalid_argument for an fp8 kv_dtype with q not fp16 / bf16 or without its scales.
void tree_attention(const TreeAttentionParams& p);

// Gradients dq, dk, dv (float32, accumulated into the zeroed p.dq / p.dk / p.dv) of tree_attention
// over the forward's plan (see TreeAttentionBackwardParams).
void tree_attention_backward(const TreeAttentionBackwardParams& p);

// Log-sum-exp merge (see MergeParams).
void merge_states(const MergeParams& p);

// Scatter new tokens' K/V into their nodes' pages.
void append_paged_kv(const AppendParams& p);

}  // namespace multiverse::cpu
