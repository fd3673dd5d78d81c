// Parameter structs of the multiverse kernels (CPU and CUDA share them).
//
// Kernels take raw pointers plus one of these structs; nothing here depends on torch, so a C++ engine
// can fill them from its own buffers (see CMakeLists.txt, target multiverse_kernels).
//
// Layout conventions (docs/design.md §2, docs/plan.md):
//   q            [total_q, Hq, D]                 strides q_stride_row, q_stride_head, last dim contiguous
//   k/v cache    [num_pages, page_size, Hk, D]    strides *_stride_page, *_stride_slot, *_stride_head
//                q's dtype, or fp8 (e4m3fn / e5m2) with fp16/bf16 q: dequantized at the load,
//                key = float(k8) * k_scale[kv_head] (TreeAttentionParams::kv_dtype, k_scale, v_scale)
//   out          [total_q, Hq, D]  contiguous, q's dtype
//   lse          [total_q, Hq]     float32, natural log of the softmax denominator (sm_scale included)
//   partial_out  [P, Hq, D]        float32 workspace, partial_lse [P, Hq] float32
// All index arrays are int32 (the plan of multiverse_kernels/planning.py).
#pragma once

#include <cstdint>

namespace multiverse {

// kFloat8E4M3: torch.float8_e4m3fn (bias 7, subnormals, no inf, NaN = S.1111.111); kFloat8E5M2:
// torch.float8_e5m2 (bias 15, IEEE-like: subnormals, inf, NaN). The fp8 types are KV-cache dtypes only.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat8E4M3 = 3, kFloat8E5M2 = 4 };

#if defined(__CUDACC__)
__host__ __device__
#endif
inline constexpr int dtype_size(DType t) {
  return t == DType::kFloat32 ? 4 : (t == DType::kFloat8E4M3 || t == DType::kFloat8E5M2) ? 1 : 2;
}

#if defined(__CUDACC__)
__host__ __device__
#endif
inline constexpr bool dtype_is_fp8(DType t) { return t == DType::kFloat8E4M3 || t == DType::kFloat8E5M2; }

// One call of the tree-attention kernel over a plan (grid: num_items x num_kv_heads work units).
struct TreeAttentionParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;           // [total_q, Hq, D] q's dtype: rows with exactly one partial are written here
  float* lse;          // [total_q, Hq]
  float* partial_out;  // [P, Hq, D]   rows with != 1 partials go through the workspace + merge
  float* partial_lse;  // [P, Hq]

  // Forest page table.
  const int32_t* node_page_indptr;
  const int32_t* node_page_indices;
  // Plan: readers.
  const int32_t* reader_row;
  const int32_t* reader_limit;
  const int32_t* reader_lo;  // first token the reader sees (sliding window; all 0 without); may be null
  // Plan: work items.
  const int32_t* item_node;
  const int32_t* item_kv_start;
  const int32_t* item_kv_len;
  const int32_t* item_reader_start;
  const int32_t* item_num_readers;
  const int32_t* item_partial_start;
  const int32_t* row_partial_indptr;  // [total_q + 1]: a row with exactly one partial skips the merge

  int64_t q_stride_row, q_stride_head;
  int64_t k_stride_page, k_stride_slot, k_stride_head;
  int64_t v_stride_page, v_stride_slot, v_stride_head;

  int32_t num_items;
  int32_t num_qo_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t page_size;
  int32_t max_chunk_tokens;  // upper bound of item_kv_len (the plan's chunk_tokens)
  int32_t max_readers;       // upper bound of item_num_readers (the plan's rows_per_tile)
  float sm_scale;
  float softcap;  // > 0: scores s = softcap * tanh(s / softcap) after sm_scale (Gemma 2); 0: off
  DType dtype;     // of q and out

  // fp8 KV cache (docs/design.md "Attention variants"): kv_dtype is the caches' dtype, == dtype or an
  // fp8 type (then dtype is kFloat16 / kBFloat16); a key is float(k8) * k_scale[kv_scale_per_head ?
  // kv_head : 0], a value float(v8) * v_scale[...]. The scales are float32 [1] (per tensor) or
  // [num_kv_heads] (per KV head, kv_scale_per_head = 1), null unless kv_dtype is fp8. A kv_dtype that
  // is not an fp8 type is read as dtype (so zero-initialised params of callers that predate it work).
  DType kv_dtype;
  const float* k_scale;
  const float* v_scale;
  int32_t kv_scale_per_head;

  // Measurement hook: when non-null, the kernel adds the K+V bytes it loads from the caches.
  int64_t* kv_bytes_loaded;
};

// Log-sum-exp merge of partial states: row r merges partial slots
// row_partial_indices[row_partial_indptr[r] : row_partial_indptr[r+1]].
// With row_partial_indices == nullptr the slots of row r are r * num_states + s (merge_states op layout,
// partial_out [N, S, H, D]); then row_partial_indptr is unused.
// Rows: merge_rows[0 : num_rows] when merge_rows != nullptr (entries < 0 are padding), else 0..num_rows.
struct MergeParams {
  const float* partial_out;   // [slots, H, D] (or [N, S, H, D]) float32 ...
  const void* partial_out_any;  // ... or this one, of dtype v_dtype, when partial_out == nullptr
  const float* partial_lse;   // [slots, H]
  const int32_t* row_partial_indptr;
  const int32_t* row_partial_indices;
  const int32_t* merge_rows;
  void* out;                  // [N, H, D] of out_dtype
  float* lse;                 // [N, H]
  int32_t num_rows;
  int32_t num_states;         // for the dense layout
  int32_t num_heads;
  int32_t head_dim;
  DType v_dtype;              // dtype of partial_out_any
  DType out_dtype;
};

// append_paged_kv: token i of k/v [n, Hk, D] goes to slot token_pos[i] of node token_node[i]; or, when
// `slots` is set, to the flat slot slots[i] = page * page_size + row (a paged engine's slot mapping,
// vLLM's), not written when slots[i] < 0 (padding); the page-table fields are then unused.
struct AppendParams {
  const void* k;
  const void* v;
  void* k_cache;
  void* v_cache;
  const int32_t* page_indptr;
  const int32_t* page_indices;
  const int32_t* token_node;
  const int32_t* token_pos;
  const int64_t* slots;  // optional (nullptr: the page-table fields)
  int64_t k_stride_tok, k_stride_head;  // of k (last dim contiguous)
  int64_t v_stride_tok, v_stride_head;
  int64_t kc_stride_page, kc_stride_slot, kc_stride_head;
  int64_t vc_stride_page, vc_stride_slot, vc_stride_head;
  int32_t num_tokens;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t page_size;
  DType src_dtype;
  DType cache_dtype;
};

// Backward of tree attention over the same plan as the forward (docs/api.md "Autograd", the reference
// multiverse_kernels/backends/reference/tree_attention_backward.py is the specification):
//   delta[r, h] = sum_e grad_out[r, h, e] * out[r, h, e] - (grad_lse[r, h] if lse[r, h] is finite)
//   P = exp(sm_scale * q k^T - lse)   (recomputed per work item, block by block; soft-capped scores
//                                      when softcap > 0, and dS then times 1 - (s / softcap)^2)
//   dv += P^T dO;  dS = P * (dO v^T - delta);  dk += sm_scale dS^T q;  dq += sm_scale dS k
// One task per (work item, KV head): the item's chunk of K/V is loaded once for all its packed rows
// (reader x GQA head); the item's dK/dV (and each row block's dQ) are accumulated locally and added to
// the outputs under striped spin locks (several items can share a chunk, every row reads many chunks).
// Rows whose lse is -inf (or NaN) see nothing and contribute nothing.
struct TreeAttentionBackwardParams {
  const void* q;         // [total_q, Hq, D]  strides q_stride_row / q_stride_head
  const void* k_cache;   // [num_pages, page_size, Hk, D]
  const void* v_cache;
  const void* out;       // [total_q, Hq, D] q's dtype, strides out_stride_row / out_stride_head
  const void* grad_out;  // [total_q, Hq, D] q's dtype, strides go_stride_row / go_stride_head
  const float* lse;      // [total_q, Hq] contiguous
  const float* grad_lse; // [total_q, Hq] contiguous, or nullptr (lse unused)
  float* dq;             // [total_q, Hq, D] contiguous float32, zero on entry
  float* dk;             // [num_pages, page_size, Hk, D] contiguous float32, zero on entry
  float* dv;             // like dk
  float* delta;          // [total_q, Hq] float32 workspace

  // Forest page table.
  const int32_t* node_page_indptr;
  const int32_t* node_page_indices;
  // Plan (the forward's: multiverse_kernels/planning.py).
  const int32_t* reader_row;
  const int32_t* reader_limit;
  const int32_t* reader_lo;  // may be null (no window)
  const int32_t* item_node;
  const int32_t* item_kv_start;
  const int32_t* item_kv_len;
  const int32_t* item_reader_start;
  const int32_t* item_num_readers;

  int64_t q_stride_row, q_stride_head;
  int64_t k_stride_page, k_stride_slot, k_stride_head;
  int64_t v_stride_page, v_stride_slot, v_stride_head;
  int64_t out_stride_row, out_stride_head;
  int64_t go_stride_row, go_stride_head;

  int32_t total_q;
  int32_t num_items;
  int32_t num_qo_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t page_size;
  float sm_scale;
  float softcap;  // > 0: s = softcap * tanh(s0 / softcap), dS *= 1 - (s / softcap)^2; 0: off
  DType dtype;  // of q, the caches, out and grad_out
};

}  // namespace multiverse
