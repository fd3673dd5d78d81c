// Small index-math functions shared by the CPU and CUDA kernels (host and device), so that the CPU
// tests exercise the exact code the GPU kernels run.
#pragma once

#include <cstdint>

#include "multiverse/params.h"

#if defined(__CUDACC__)
#define MV_HD __host__ __device__ __forceinline__
#else
#define MV_HD inline
#endif

namespace multiverse {

// Page-table lookup: the cache page holding token `token` of node `node` (docs/design.md §2: every node starts
// at slot 0 of its first page).
MV_HD int32_t token_page(const int32_t* node_page_indptr, const int32_t* node_page_indices, int32_t node,
                         int32_t token, int32_t page_size) {
  return node_page_indices[node_page_indptr[node] + token / page_size];
}

// log2(page_size) when page_size is a power of two, else -1 (paged_offset then divides).
MV_HD int32_t page_shift(int32_t page_size) {
  int32_t s = 0;
  while (s < 30 && (int32_t{1} << s) < page_size) ++s;
  return (int32_t{1} << s) == page_size ? s : -1;
}

// Element offset of token `token` of a node whose page list starts at `node_pages`, in a cache with the
// given page / slot strides, plus `head_offset` (kv_head * stride_head). `shift`: page_shift(page_size)
// (a shift and a mask instead of a division; a caller looking up many rows binds it once) or -1.
MV_HD int64_t paged_offset(const int32_t* node_pages, int32_t token, int32_t page_size, int32_t shift,
                           int64_t stride_page, int64_t stride_slot, int64_t head_offset) {
  int32_t page, slot;
  if (shift >= 0) {
    page = token >> shift;
    slot = token & (page_size - 1);
  } else {
    page = token / page_size;
    slot = token - page * page_size;
  }
  return static_cast<int64_t>(node_pages[page]) * stride_page + static_cast<int64_t>(slot) * stride_slot +
         head_offset;
}

// Element offset of (token, kv head) of a node in a cache with the given strides.
MV_HD int64_t cache_offset(const int32_t* node_page_indptr, const int32_t* node_page_indices,
                           int32_t node, int32_t token, int32_t page_size, int32_t kv_head,
                           int64_t stride_page, int64_t stride_slot, int64_t stride_head) {
  return paged_offset(node_page_indices + node_page_indptr[node], token, page_size, -1, stride_page,
                      stride_slot, static_cast<int64_t>(kv_head) * stride_head);
}

// Element offset of KV head `kv_head` of flat slot `slot` (= page * page_size + row) in a cache of the
// given strides (a paged engine's slot mapping; slot >= 0).
MV_HD int64_t slot_offset(int64_t slot, int32_t page_size, int32_t kv_head, int64_t stride_page,
                          int64_t stride_slot, int64_t stride_head) {
  return (slot / page_size) * stride_page + (slot % page_size) * stride_slot +
         static_cast<int64_t>(kv_head) * stride_head;
}

// Element offset of KV head `h` of append row `i` in the K cache (value = false) or the V cache: its
// flat slot when p.slots is set, else slot token_pos[i] of node token_node[i] (AppendParams).
MV_HD int64_t append_offset(const AppendParams& p, int64_t i, int32_t h, bool value) {
  const int64_t sp = value ? p.vc_stride_page : p.kc_stride_page;
  const int64_t ss = value ? p.vc_stride_slot : p.kc_stride_slot;
  const int64_t sh = value ? p.vc_stride_head : p.kc_stride_head;
  return p.slots != nullptr
             ? slot_offset(p.slots[i], p.page_size, h, sp, ss, sh)
             : cache_offset(p.page_indptr, p.page_indices, p.token_node[i], p.token_pos[i], p.page_size, h, sp, ss, sh);
}

// How many tokens of the chunk [kv_start, kv_start + kv_len) a reader with `limit` visible leading
// tokens of the node sees (0 when the chunk lies entirely past its limit).
MV_HD int32_t visible_in_chunk(int32_t limit, int32_t kv_start, int32_t kv_len) {
  int32_t v = limit - kv_start;
  v = v < kv_len ? v : kv_len;
  return v > 0 ? v : 0;
}

// First token of the chunk [kv_start, ...) a reader whose window starts at node token `lo` sees, relative
// to the chunk (0 when the window starts at or before the chunk; reader_lo may be null: no window).
MV_HD int32_t window_lo_in_chunk(const int32_t* reader_lo, int32_t rd, int32_t kv_start) {
  if (reader_lo == nullptr) return 0;
  const int32_t v = reader_lo[rd] - kv_start;
  return v > 0 ? v : 0;
}

// GQA: the query heads of KV head `kv_head` are kv_head * group .. kv_head * group + group - 1.
MV_HD int32_t gqa_group(int32_t num_qo_heads, int32_t num_kv_heads) { return num_qo_heads / num_kv_heads; }

// Row m of a work item's packed (reader, GQA head) row dimension: reader m / group, head m % group.
MV_HD int32_t packed_reader(int32_t m, int32_t group) { return m / group; }
MV_HD int32_t packed_head(int32_t m, int32_t group, int32_t kv_head) { return kv_head * group + m % group; }

// Offset of partial (slot, head) in partial_out [P, Hq, D] / partial_lse [P, Hq].
MV_HD int64_t partial_out_offset(int32_t slot, int32_t head, int32_t num_qo_heads, int32_t head_dim) {
  return (static_cast<int64_t>(slot) * num_qo_heads + head) * head_dim;
}
MV_HD int64_t partial_lse_offset(int32_t slot, int32_t head, int32_t num_qo_heads) {
  return static_cast<int64_t>(slot) * num_qo_heads + head;
}

// Bytes of K plus V one work unit (item, kv head) loads from the caches: `tokens` tokens of one head.
MV_HD int64_t chunk_kv_bytes(int32_t tokens, int32_t head_dim, int32_t elem_size) {
  return 2 * static_cast<int64_t>(tokens) * head_dim * elem_size;
}

}  // namespace multiverse
