// CUDA log-sum-exp merge: one warp per (row, head); lanes split head_dim (fp32 accumulation).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "multiverse/cuda_kernels.h"

namespace multiverse::cuda {
namespace {

template <class T> __device__ __forceinline__ float ld(const T* p);
template <> __device__ __forceinline__ float ld<float>(const float* p) { return *p; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <class T> __device__ __forceinline__ void st(T* p, float x);
template <> __device__ __forceinline__ void st<float>(float* p, float x) { *p = x; }
template <> __device__ __forceinline__ void st<__half>(__half* p, float x) { *p = __float2half_rn(x); }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

template <class In, class Out>
__global__ void merge_kernel(const MergeParams p) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const int H = p.num_heads, D = p.head_dim;
  if (warp >= static_cast<int64_t>(p.num_rows) * H) return;
  const int idx = static_cast<int>(warp / H), h = static_cast<int>(warp % H);
  const int r = p.merge_rows != nullptr ? p.merge_rows[idx] : idx;
  if (r < 0) return;  // capacity padding
  int b, e;
  if (p.row_partial_indices != nullptr) { b = p.row_partial_indptr[r]; e = p.row_partial_indptr[r + 1]; }
  else { b = r * p.num_states; e = b + p.num_states; }
  auto slot_of = [&](int i) -> int64_t { return p.row_partial_indices != nullptr ? p.row_partial_indices[i] : i; };
  const In* vin = p.partial_out != nullptr ? reinterpret_cast<const In*>(p.partial_out)
                                           : static_cast<const In*>(p.partial_out_any);
  float m = -INFINITY;
  bool bad = false;  // NaN policy (docs/errors.md, the reference): a NaN or +Inf lse makes the row NaN
  for (int i = b; i < e; ++i) {
    const float ls = p.partial_lse[slot_of(i) * H + h];
    bad |= isnan(ls) || ls == INFINITY;
    m = fmaxf(m, ls);  // (skips a NaN)
  }
  // A bad row runs with m = NaN: every weight, den, out and lse are then NaN. Otherwise den is 0 exactly
  // when no state is non-empty (the largest one weighs 1): out 0, lse -inf.
  if (bad) m = NAN;
  float den = 0.f;
  Out* dst = static_cast<Out*>(p.out) + (static_cast<int64_t>(r) * H + h) * D;
  for (int d0 = 0; d0 < D; d0 += 32 * 4) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    float dsum = 0.f;
    if (m != -INFINITY) {
      for (int i = b; i < e; ++i) {
        const int64_t sl = slot_of(i);
        const float ls = p.partial_lse[sl * H + h];
        if (ls == -INFINITY) continue;
        const float w = __expf(ls - m);
        dsum += w;
        const In* src = vin + (sl * H + h) * D;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int d = d0 + lane + 32 * k;
          if (d < D) acc[k] += w * ld(src + d);
        }
      }
    }
    den = dsum;
    const float inv = den != 0.f ? 1.f / den : 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int d = d0 + lane + 32 * k;
      if (d < D) st(dst + d, acc[k] * inv);
    }
  }
  if (lane == 0) p.lse[static_cast<int64_t>(r) * H + h] = den != 0.f ? m + __logf(den) : -INFINITY;
}

template <class In, class Out>
cudaError_t launch(const MergeParams& p, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(p.num_rows) * p.num_heads;
  if (warps == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (warps * 32 + threads - 1) / threads;
  merge_kernel<In, Out><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t merge_states(const MergeParams& p, cudaStream_t stream) {
  if (p.partial_out != nullptr) {  // plan merge: fp32 workspace -> out dtype
    switch (p.out_dtype) {
      case DType::kFloat16: return launch<float, __half>(p, stream);
      case DType::kBFloat16: return launch<float, __nv_bfloat16>(p, stream);
      default: return launch<float, float>(p, stream);
    }
  }
  switch (p.v_dtype) {  // merge_states op: same dtype in and out
    case DType::kFloat16: return launch<__half, __half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16, __nv_bfloat16>(p, stream);
    default: return launch<float, float>(p, stream);
  }
}

}  // namespace multiverse::cuda
