// CUDA append: copy token i's K/V rows into their node's page slot (or flat slot slots[i]). One thread
// per 16 bytes when every row is 16-byte aligned (uint4 loads/stores), else per element. Same dtype in
// and out.
#include <cstdint>
#include <initializer_list>

#include "multiverse/cuda_kernels.h"
#include "multiverse/index_math.h"

namespace multiverse::cuda {
namespace {

template <class V>  // V: uint4 (16 bytes) or the element type's same-size integer
__global__ void append_kernel(const AppendParams p, int per_row) {  // per_row: V units per head row
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = static_cast<int64_t>(p.num_tokens) * p.num_kv_heads * per_row;
  if (idx >= total) return;
  const int c = static_cast<int>(idx % per_row);
  const int h = static_cast<int>((idx / per_row) % p.num_kv_heads);
  const int64_t i = idx / (static_cast<int64_t>(per_row) * p.num_kv_heads);
  const int esz = dtype_size(p.cache_dtype);
  if (p.slots != nullptr && p.slots[i] < 0) return;  // padding
  const int64_t ko = append_offset(p, i, h, false), vo = append_offset(p, i, h, true);
  const char* ks = static_cast<const char*>(p.k) + (i * p.k_stride_tok + h * p.k_stride_head) * esz;
  const char* vs = static_cast<const char*>(p.v) + (i * p.v_stride_tok + h * p.v_stride_head) * esz;
  reinterpret_cast<V*>(static_cast<char*>(p.k_cache) + ko * esz)[c] = reinterpret_cast<const V*>(ks)[c];
  reinterpret_cast<V*>(static_cast<char*>(p.v_cache) + vo * esz)[c] = reinterpret_cast<const V*>(vs)[c];
}

template <class V>
cudaError_t launch(const AppendParams& p, int per_row, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.num_tokens) * p.num_kv_heads * per_row;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  append_kernel<V><<<static_cast<unsigned>((total + threads - 1) / threads), threads, 0, stream>>>(p, per_row);
  return cudaGetLastError();
}

bool al16(const void* ptr, std::initializer_list<int64_t> strides, int esz) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16) return false;
  for (int64_t s : strides)
    if ((s * esz) % 16) return false;
  return true;
}

}  // namespace

cudaError_t append_paged_kv(const AppendParams& p, cudaStream_t stream) {
  if (p.src_dtype != p.cache_dtype) return cudaErrorInvalidValue;
  const int esz = dtype_size(p.cache_dtype);
  const int row_bytes = p.head_dim * esz;
  const bool vec = row_bytes % 16 == 0 && al16(p.k, {p.k_stride_tok, p.k_stride_head}, esz) &&
                   al16(p.v, {p.v_stride_tok, p.v_stride_head}, esz) &&
                   al16(p.k_cache, {p.kc_stride_page, p.kc_stride_slot, p.kc_stride_head}, esz) &&
                   al16(p.v_cache, {p.vc_stride_page, p.vc_stride_slot, p.vc_stride_head}, esz);
  if (vec) return launch<uint4>(p, row_bytes / 16, stream);
  if (esz == 4) return launch<uint32_t>(p, p.head_dim, stream);
  return launch<uint16_t>(p, p.head_dim, stream);
}

}  // namespace multiverse::cuda
