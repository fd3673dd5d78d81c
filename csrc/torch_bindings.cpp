// torch.ops.multiverse_C.*: schemas (TORCH_LIBRARY) and the CPU implementations (TORCH_LIBRARY_IMPL).
// The CUDA implementations live in torch_bindings_cuda.cpp (built only with the CUDA extension).
// Fake (meta) implementations are registered from Python (multiverse_kernels/backends/_ext.py).
//
// The namespace is multiverse_C so it does not clash with the Python custom ops torch.ops.multiverse.*,
// which dispatch on their `backend` argument and call these ops for backend="cpu"/"cuda".
#include <optional>
#include <stdexcept>
#include <vector>

#include "multiverse/cpu_kernels.h"
#include "torch_utils.h"

namespace multiverse::bind {
namespace {

std::tuple<at::Tensor, at::Tensor> tree_attention_run_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& node_page_indptr, const at::Tensor& node_page_indices, at::TensorList plan,
    at::IntArrayRef plan_ints, double sm_scale, const std::optional<at::Tensor>& kv_bytes) {
  TORCH_CHECK(q.device().is_cpu(), "q: expected a CPU tensor");
  TreeAttentionParams p = make_attention_params(q, k_cache, v_cache, node_page_indptr, node_page_indices,
                                                plan, plan_ints, sm_scale);
  AttentionBuffers b = alloc_attention_buffers(p, q, plan_ints, kv_bytes);
  multiverse::cpu::tree_attention(p);
  MergeParams m = make_plan_merge_params(p, plan, b.out, b.lse);
  multiverse::cpu::merge_states(m);
  return {b.out, b.lse};
}

std::tuple<at::Tensor, at::Tensor> merge_states_cpu(const at::Tensor& v, const at::Tensor& s) {
  TORCH_CHECK(v.device().is_cpu(), "v: expected a CPU tensor");
  auto vc = v.contiguous();
  auto sc = s.contiguous();
  auto [out, lse] = alloc_merge_outputs(v);
  MergeParams m = make_merge_params(vc, sc, out, lse);
  multiverse::cpu::merge_states(m);
  return {out, lse};
}

void append_paged_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& page_indptr,
                         const at::Tensor& page_indices, const at::Tensor& token_node,
                         const at::Tensor& token_pos) {
  TORCH_CHECK(k.device().is_cpu(), "k: expected a CPU tensor");
  AppendParams p = make_append_params(k, v, k_cache, v_cache, page_indptr, page_indices, token_node,
                                      token_pos);
  multiverse::cpu::append_paged_kv(p);
}

// multiverse_C::tree_attention: the Python op's schema (metadata in, planning inside, in C++).
std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& node_page_indptr,
    const at::Tensor& node_page_indices, const at::Tensor& node_len, const at::Tensor& qo_indptr,
    const at::Tensor& vis_indptr, const at::Tensor& vis_nodes, const std::optional<at::Tensor>& own_full,
    double sm_scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q: expected [total_q, Hq, D] and 4-D caches");
  const int64_t group = q.size(1) / std::max<int64_t>(k_cache.size(2), 1);
  // Same choices as multiverse_kernels/backends/cpu: 256-token chunks, <= 1024 packed rows per item.
  auto [ts, ints] = host_plan(node_len, qo_indptr, vis_indptr, vis_nodes, own_full, 256,
                              std::max<int64_t>(1, 1024 / std::max<int64_t>(group, 1)), std::max<int64_t>(group, 1),
                              k_cache.size(2), 1, q.device());
  return tree_attention_run_cpu(q, k_cache, v_cache, node_page_indptr, node_page_indices, ts, ints, sm_scale,
                                std::nullopt);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> plan_tree_attention_op(
    const at::Tensor& node_len, const at::Tensor& qo_indptr, const at::Tensor& vis_indptr,
    const at::Tensor& vis_nodes, const std::optional<at::Tensor>& own_full, int64_t chunk_tokens,
    int64_t rows_per_tile, int64_t group, int64_t num_kv_heads, int64_t num_workers) {
  auto [ts, ints] = host_plan(node_len, qo_indptr, vis_indptr, vis_nodes, own_full, chunk_tokens, rows_per_tile,
                              group, num_kv_heads, num_workers, node_len.device());
  auto it = at::empty({static_cast<int64_t>(ints.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(ints.begin(), ints.end(), it.data_ptr<int64_t>());
  return {ts, it};
}

// [selected, supported] CPU micro-kernel ISA (multiverse::cpu::CpuIsa values): what tree_attention runs
// now (MULTIVERSE_CPU_ISA applied) and the widest this CPU supports.
std::vector<int64_t> cpu_isa_op() {
  const int64_t best = static_cast<int64_t>(multiverse::cpu::cpu_isa_supported());
  int64_t sel = -1;  // -1: MULTIVERSE_CPU_ISA names something this CPU cannot run
  try {
    sel = static_cast<int64_t>(multiverse::cpu::cpu_isa_selected());
  } catch (const std::invalid_argument&) {
  }
  return {sel, best};
}

}  // namespace
}  // namespace multiverse::bind

TORCH_LIBRARY(multiverse_C, m) {
  // Same schema as torch.ops.multiverse.tree_attention minus backend/validate: plans in C++ per call
  // (for C++ callers; the Python backends plan once per step and call tree_attention_run).
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor node_page_indptr, "
      "Tensor node_page_indices, Tensor node_len, Tensor qo_indptr, Tensor vis_indptr, Tensor vis_nodes, "
      "Tensor? own_full, float sm_scale) -> (Tensor, Tensor)");
  // The host planner (csrc/plan.cpp), identical to multiverse_kernels.planning: (plan tensors on the
  // metadata's device, int64 tensor of TreePlan.INT_FIELDS). chunk_tokens 0: automatic split for
  // num_workers. Eager only (data-dependent sizes).
  m.def(
      "plan_tree_attention(Tensor node_len, Tensor qo_indptr, Tensor vis_indptr, Tensor vis_nodes, "
      "Tensor? own_full, int chunk_tokens, int rows_per_tile, int group=1, int num_kv_heads=1, "
      "int num_workers=1) -> (Tensor[], Tensor)");
  // The plan field lists this library was built with (multiverse_kernels/plan_format.py FORMAT_STRING).
  m.def("plan_format() -> str");
  // Run step of tree attention over a plan (TreePlan.tensors(), TreePlan.ints()); kv_bytes: optional
  // int64[1] the kernel adds the K+V bytes it loads to (measurement hook).
  m.def(
      "tree_attention_run(Tensor q, Tensor k_cache, Tensor v_cache, Tensor node_page_indptr, "
      "Tensor node_page_indices, Tensor[] plan_tensors, int[] plan_ints, float sm_scale, "
      "Tensor(a!)? kv_bytes=None) -> (Tensor, Tensor)");
  m.def("merge_states(Tensor v, Tensor s) -> (Tensor, Tensor)");
  // [selected, supported] micro-kernel ISA of the CPU tree_attention (0 baseline, 1 avx2, 2 avx512).
  m.def("cpu_isa() -> int[]", &multiverse::bind::cpu_isa_op);
  m.def(
      "append_paged_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor page_indptr, "
      "Tensor page_indices, Tensor token_node, Tensor token_pos) -> ()");
}

TORCH_LIBRARY_IMPL(multiverse_C, CompositeExplicitAutograd, m) {
  m.impl("plan_tree_attention", &multiverse::bind::plan_tree_attention_op);
  m.impl("plan_format", []() -> std::string { return MULTIVERSE_PLAN_FORMAT; });
}

TORCH_LIBRARY_IMPL(multiverse_C, CPU, m) {
  m.impl("tree_attention", &multiverse::bind::tree_attention_cpu);
  m.impl("tree_attention_run", &multiverse::bind::tree_attention_run_cpu);
  m.impl("merge_states", &multiverse::bind::merge_states_cpu);
  m.impl("append_paged_kv", &multiverse::bind::append_paged_kv_cpu);
}
