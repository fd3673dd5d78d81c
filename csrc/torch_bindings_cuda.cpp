// CUDA implementations of torch.ops.multiverse_C.* (schemas in torch_bindings.cpp).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "multiverse/cuda_kernels.h"
#include "torch_utils.h"

namespace multiverse::bind {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, what, " failed: ", cudaGetErrorString(e));
}

std::tuple<at::Tensor, at::Tensor> tree_attention_run_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& node_page_indptr, const at::Tensor& node_page_indices, at::TensorList plan,
    at::IntArrayRef plan_ints, double sm_scale, const std::optional<at::Tensor>& kv_bytes, double softcap,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.is_cuda(), "q: expected a CUDA tensor");
  // A sliding-window plan (its reader_lo), the soft-cap and fp8 KV caches (float8_e4m3fn / float8_e5m2
  // with float16 / bfloat16 q and float32 k_scale / v_scale [1] or [num_kv_heads]: checked, naming the
  // argument, by make_attention_params) run in both CUDA kernels (tree_attention.cu).
  TORCH_CHECK(softcap >= 0.0, "softcap: expected a positive float (0: off)");
  TORCH_CHECK(q.size(2) <= 256, "q: the cuda backend supports head_dim <= 256, got ", q.size(2));
  const c10::cuda::CUDAGuard guard(q.device());
  TreeAttentionParams p = make_attention_params(q, k_cache, v_cache, node_page_indptr, node_page_indices,
                                                plan, plan_ints, sm_scale, k_scale, v_scale);
  p.softcap = static_cast<float>(softcap);
  AttentionBuffers b = alloc_attention_buffers(p, q, plan_ints, kv_bytes);
  auto stream = at::cuda::getCurrentCUDAStream();
  check_cuda(multiverse::cuda::tree_attention(p, stream), "multiverse tree_attention kernel");
  MergeParams m = make_plan_merge_params(p, plan, b.out, b.lse);
  check_cuda(multiverse::cuda::merge_states(m, stream), "multiverse merge kernel");
  return {b.out, b.lse};
}

std::tuple<at::Tensor, at::Tensor> merge_states_cuda(const at::Tensor& v, const at::Tensor& s) {
  TORCH_CHECK(v.is_cuda(), "v: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(v.device());
  auto vc = v.contiguous();
  auto sc = s.contiguous();
  auto [out, lse] = alloc_merge_outputs(v);
  MergeParams m = make_merge_params(vc, sc, out, lse);
  check_cuda(multiverse::cuda::merge_states(m, at::cuda::getCurrentCUDAStream()), "multiverse merge kernel");
  return {out, lse};
}

void append_paged_kv_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& page_indptr,
                          const at::Tensor& page_indices, const at::Tensor& token_node,
                          const at::Tensor& token_pos) {
  TORCH_CHECK(k.is_cuda(), "k: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(k.device());
  // The kernel copies bytes: cast the new tokens to the cache dtype first.
  const at::Tensor kk = k.scalar_type() == k_cache.scalar_type() ? k : k.to(k_cache.scalar_type());
  const at::Tensor vv = v.scalar_type() == v_cache.scalar_type() ? v : v.to(v_cache.scalar_type());
  AppendParams p = make_append_params(kk, vv, k_cache, v_cache, page_indptr, page_indices, token_node,
                                      token_pos);
  check_cuda(multiverse::cuda::append_paged_kv(p, at::cuda::getCurrentCUDAStream()),
             "multiverse append kernel");
}

void append_kv_slots_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.is_cuda(), "k: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor kk = k.scalar_type() == k_cache.scalar_type() ? k : k.to(k_cache.scalar_type());
  const at::Tensor vv = v.scalar_type() == v_cache.scalar_type() ? v : v.to(v_cache.scalar_type());
  check_cuda(multiverse::cuda::append_paged_kv(make_slot_append_params(kk, vv, k_cache, v_cache, slot_mapping),
                                               at::cuda::getCurrentCUDAStream()),
             "multiverse append kernel");
}

std::tuple<at::Tensor, at::Tensor> tree_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& node_page_indptr,
    const at::Tensor& node_page_indices, const at::Tensor& node_len, const at::Tensor& qo_indptr,
    const at::Tensor& vis_indptr, const at::Tensor& vis_nodes, const std::optional<at::Tensor>& own_full,
    double sm_scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q: expected [total_q, Hq, D] and 4-D caches");
  const int64_t group = std::max<int64_t>(q.size(1) / std::max<int64_t>(k_cache.size(2), 1), 1);
  // Same choices as multiverse_kernels/backends/cuda (planning.py defaults): chunks chosen for 2 work
  // items per SM (chunk_tokens 0), 256 / 128 / 32 packed rows (head_dim 64 / 128 / 256) per item. Plans on
  // the host (sync). Row tile = planning.MAX_TILE_ROWS.
  const int64_t tile_rows = q.size(2) >= 256 ? 32 : q.size(2) > 64 ? 128 : 256;
  const int64_t workers = 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto [ts, ints] = host_plan(node_len, qo_indptr, vis_indptr, vis_nodes, own_full, 0,
                              std::max<int64_t>(1, tile_rows / group), group, k_cache.size(2), workers,
                              q.device());
  return tree_attention_run_cuda(q, k_cache, v_cache, node_page_indptr, node_page_indices, ts, ints, sm_scale,
                                 std::nullopt, 0.0, std::nullopt, std::nullopt);
}

}  // namespace
}  // namespace multiverse::bind

TORCH_LIBRARY_IMPL(multiverse_C, CUDA, m) {
  m.impl("tree_attention", &multiverse::bind::tree_attention_cuda);
  m.impl("tree_attention_run", &multiverse::bind::tree_attention_run_cuda);
  m.impl("merge_states", &multiverse::bind::merge_states_cuda);
  m.impl("append_paged_kv", &multiverse::bind::append_paged_kv_cuda);
  m.impl("append_kv_slots", &multiverse::bind::append_kv_slots_cuda);
}
