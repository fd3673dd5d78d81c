// CUDA kernels (csrc/cuda/*.cu): host launchers taking params structs with DEVICE pointers and a
// stream. No torch types; the CMake target multiverse_kernels_cuda builds them for sm_90a / sm_100a.
#pragma once

#include <cuda_runtime.h>

#include "multiverse/params.h"

namespace multiverse::cuda {

// Attention over a plan: grid (num_items, num_kv_heads). Rows with exactly one partial are written to
// p.out / p.lse, the others to the partial workspace (then call merge_states with the plan's rows).
// fp16/bf16 with head_dim 64/128/256 use the tensor-core kernel (mma.sync m16n8k16, cp.async double
// buffering, 16-byte loads); fp32 and other head dims use a SIMT kernel. Both run the sliding window
// (p.reader_lo), the soft-cap (p.softcap) and fp8 KV caches (p.kv_dtype e4m3fn / e5m2 with fp16 / bf16
// q and p.k_scale / p.v_scale; cudaErrorInvalidValue without them or with fp32 q). Returns the launch
// error.
cudaError_t tree_attention(const TreeAttentionParams& p, cudaStream_t stream);

// True when tree_attention takes the tensor-core path for these params (q and caches 16-byte aligned:
// base pointers, and row / head / page / slot strides in bytes).
bool tree_attention_uses_mma(const TreeAttentionParams& p);

// Dynamic shared memory the tensor-core kernel uses for (dtype, head_dim) and q's-dtype caches, or fp8
// caches (fp8_kv); 0 when it takes the SIMT path (host-only, no CUDA calls: the compile report prints it).
size_t tree_attention_smem_bytes(DType dtype, int head_dim, bool fp8_kv = false);

cudaError_t merge_states(const MergeParams& p, cudaStream_t stream);

// Requires src and cache of the same dtype (the torch binding casts k/v first).
cudaError_t append_paged_kv(const AppendParams& p, cudaStream_t stream);

}  // namespace multiverse::cuda
