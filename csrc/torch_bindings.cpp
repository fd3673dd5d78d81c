// torch.ops.multiverse_C.*: schemas (TORCH_LIBRARY) and the CPU implementations (TORCH_LIBRARY_IMPL).
// The CUDA implementations live in torch_bindings_cuda.cpp (built only with the CUDA extension).
// Fake (meta) implementations are registered from Python (multiverse_kernels/backends/_ext.py).
//
// The namespace is multiverse_C so it does not clash with the Python custom ops torch.ops.multiverse.*,
// which dispatch on their `backend` argument and call these ops for backend="cpu"/"cuda".
#include <optional>
#include <stdexcept>
#include <vector>

#include "multiverse/absorb.h"
#include "multiverse/block_tables.h"
#include "multiverse/cpu_kernels.h"
#include <ATen/Parallel.h>

#include "torch_utils.h"

namespace multiverse::bind {
namespace {

std::tuple<at::Tensor, at::Tensor> tree_attention_run_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& node_page_indptr, const at::Tensor& node_page_indices, at::TensorList plan,
    at::IntArrayRef plan_ints, double sm_scale, const std::optional<at::Tensor>& kv_bytes, double softcap,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.device().is_cpu(), "q: expected a CPU tensor");
  TORCH_CHECK(softcap >= 0.0, "softcap: expected a positive float (0: off)");
  TreeAttentionParams p = make_attention_params(q, k_cache, v_cache, node_page_indptr, node_page_indices,
                                                plan, plan_ints, sm_scale, k_scale, v_scale);
  p.softcap = static_cast<float>(softcap);
  AttentionBuffers b = alloc_attention_buffers(p, q, plan_ints, kv_bytes);
  multiverse::cpu::tree_attention(p);
  MergeParams m = make_plan_merge_params(p, plan, b.out, b.lse);
  multiverse::cpu::merge_states(m);
  return {b.out, b.lse};
}

// Backward over the forward's plan: (dq, dk_cache, dv_cache) in q's dtype; cache slots no row sees
// get 0. out/grad_out are taken in q's dtype (converted if not); lse/grad_lse float32 [total_q, Hq].
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_attention_backward_run_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& node_page_indptr, const at::Tensor& node_page_indices, at::TensorList plan,
    at::IntArrayRef plan_ints, double sm_scale, double softcap) {
  TORCH_CHECK(q.device().is_cpu(), "q: expected a CPU tensor");
  TORCH_CHECK(softcap >= 0.0, "softcap: expected a positive float (0: off)");
  TORCH_CHECK(!is_fp8(k_cache.scalar_type()) && !is_fp8(v_cache.scalar_type()),
              "k_cache: an fp8 KV cache is forward only: tree_attention_backward_run does not take ",
              k_cache.scalar_type(), " / ", v_cache.scalar_type(), " caches");
  const TreeAttentionParams a = make_attention_params(q, k_cache, v_cache, node_page_indptr, node_page_indices,
                                                      plan, plan_ints, sm_scale);
  TORCH_CHECK(out.sizes() == q.sizes(), "out: expected the shape of q");
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out: expected the shape of q");
  TORCH_CHECK(out.device() == q.device() && grad_out.device() == q.device(), "out: expected q's device");
  const auto like_q = [&](const at::Tensor& t) {
    at::Tensor r = t.scalar_type() == q.scalar_type() ? t : t.to(q.scalar_type());
    return r.stride(-1) == 1 ? r : r.contiguous();
  };
  const at::Tensor o = like_q(out), go = like_q(grad_out);
  const int64_t total_q = q.size(0), hq = q.size(1);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == total_q && lse.size(1) == hq,
              "lse: expected float32 [total_q, Hq]");
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor gl;
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->dim() == 2 && grad_lse->size(0) == total_q && grad_lse->size(1) == hq,
                "grad_lse: expected [total_q, Hq]");
    gl = grad_lse->to(at::kFloat).contiguous();
  }
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::zeros(q.sizes(), f32);
  at::Tensor dk = at::zeros(k_cache.sizes(), f32);
  at::Tensor dv = at::zeros(v_cache.sizes(), f32);
  at::Tensor delta = at::empty({total_q, hq}, f32);
  TreeAttentionBackwardParams p{};
  p.q = a.q;
  p.k_cache = a.k_cache;
  p.v_cache = a.v_cache;
  p.out = o.data_ptr();
  p.grad_out = go.data_ptr();
  p.lse = lse_c.data_ptr<float>();
  p.grad_lse = gl.defined() ? gl.data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.node_page_indptr = a.node_page_indptr;
  p.node_page_indices = a.node_page_indices;
  p.reader_row = a.reader_row;
  p.reader_limit = a.reader_limit;
  p.reader_lo = a.reader_lo;
  p.item_node = a.item_node;
  p.item_kv_start = a.item_kv_start;
  p.item_kv_len = a.item_kv_len;
  p.item_reader_start = a.item_reader_start;
  p.item_num_readers = a.item_num_readers;
  p.q_stride_row = a.q_stride_row;
  p.q_stride_head = a.q_stride_head;
  p.k_stride_page = a.k_stride_page;
  p.k_stride_slot = a.k_stride_slot;
  p.k_stride_head = a.k_stride_head;
  p.v_stride_page = a.v_stride_page;
  p.v_stride_slot = a.v_stride_slot;
  p.v_stride_head = a.v_stride_head;
  p.out_stride_row = o.stride(0);
  p.out_stride_head = o.stride(1);
  p.go_stride_row = go.stride(0);
  p.go_stride_head = go.stride(1);
  p.total_q = static_cast<int32_t>(total_q);
  p.num_items = a.num_items;
  p.num_qo_heads = a.num_qo_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.head_dim = a.head_dim;
  p.page_size = a.page_size;
  p.sm_scale = a.sm_scale;
  p.softcap = static_cast<float>(softcap);
  p.dtype = a.dtype;
  multiverse::cpu::tree_attention_backward(p);
  if (q.scalar_type() == at::kFloat) return {dq, dk, dv};
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
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

void append_kv_slots_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.device().is_cpu(), "k: expected a CPU tensor");
  // (fp8 rows or caches are refused by the params' dtype check: the kernel has no fp8 copy)
  multiverse::cpu::append_paged_kv(make_slot_append_params(k, v, k_cache, v_cache, slot_mapping));
}

// multiverse_C::tree_attention: the Python op's schema (metadata in, planning inside, in C++).
std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& node_page_indptr,
    const at::Tensor& node_page_indices, const at::Tensor& node_len, const at::Tensor& qo_indptr,
    const at::Tensor& vis_indptr, const at::Tensor& vis_nodes, const std::optional<at::Tensor>& own_full,
    double sm_scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q: expected [total_q, Hq, D] and 4-D caches");
  const int64_t group = q.size(1) / std::max<int64_t>(k_cache.size(2), 1);
  // Same choices as multiverse_kernels/backends/cpu: chunks chosen per node from the thread count
  // (chunk_tokens 0 = auto), <= 1024 packed rows per item.
  auto [ts, ints] = host_plan(node_len, qo_indptr, vis_indptr, vis_nodes, own_full, 0,
                              std::max<int64_t>(1, 1024 / std::max<int64_t>(group, 1)), std::max<int64_t>(group, 1),
                              k_cache.size(2), std::max<int64_t>(1, at::get_num_threads()), q.device());
  return tree_attention_run_cpu(q, k_cache, v_cache, node_page_indptr, node_page_indices, ts, ints, sm_scale,
                                std::nullopt, 0.0, std::nullopt, std::nullopt);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> plan_tree_attention_op(
    const at::Tensor& node_len, const at::Tensor& qo_indptr, const at::Tensor& vis_indptr,
    const at::Tensor& vis_nodes, const std::optional<at::Tensor>& own_full, int64_t chunk_tokens,
    int64_t rows_per_tile, int64_t group, int64_t num_kv_heads, int64_t num_workers,
    const std::optional<at::Tensor>& node_pos, int64_t window) {
  auto [ts, ints] = host_plan(node_len, qo_indptr, vis_indptr, vis_nodes, own_full, chunk_tokens, rows_per_tile,
                              group, num_kv_heads, num_workers, node_len.device(), node_pos, window);
  auto it = at::empty({static_cast<int64_t>(ints.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(ints.begin(), ints.end(), it.data_ptr<int64_t>());
  return {ts, it};
}

// Tiny-node absorption (csrc/absorb.cpp): [node_page_indptr, node_page_indices, node_len, vis_indptr,
// vis_nodes] of the rewritten forest as int32 CPU tensors, or 5 empty ones when nothing is absorbed.
std::vector<at::Tensor> absorb_tiny_nodes_op(const at::Tensor& node_page_indptr, const at::Tensor& node_page_indices,
                                             const at::Tensor& node_len, const at::Tensor& qo_indptr,
                                             const at::Tensor& vis_indptr, const at::Tensor& vis_nodes,
                                             int64_t page_size, int64_t group, int64_t head_dim,
                                             int64_t kv_elem_size, int64_t max_absorbed_tokens) {
  const at::Tensor pi = host_i32(node_page_indptr, "node_page_indptr");
  const at::Tensor pg = host_i32(node_page_indices, "node_page_indices");
  const at::Tensor nl = host_i32(node_len, "node_len"), qo = host_i32(qo_indptr, "qo_indptr");
  const at::Tensor vi = host_i32(vis_indptr, "vis_indptr"), vn = host_i32(vis_nodes, "vis_nodes");
  TORCH_CHECK(pi.numel() == nl.numel() + 1, "node_page_indptr: expected the length of node_len + 1");
  TORCH_CHECK(pi.data_ptr<int32_t>()[nl.numel()] == pg.numel(),
              "node_page_indptr: expected its last entry == len(node_page_indices)");
  TORCH_CHECK(vi.numel() == qo.numel() && qo.numel() >= 1, "vis_indptr: expected the length of qo_indptr");
  TORCH_CHECK(vi.data_ptr<int32_t>()[vi.numel() - 1] == vn.numel(),
              "vis_indptr: expected its last entry == len(vis_nodes)");
  const auto as_i32 = [](int64_t v, const char* name) {
    TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int32_t>::max(), name, ": expected a non-negative int32, got ", v);
    return static_cast<int32_t>(v);
  };
  HostForest f;
  bool any = false;
  try {
    any = absorb_tiny_nodes(pi.data_ptr<int32_t>(), pg.data_ptr<int32_t>(), nl.data_ptr<int32_t>(),
                            static_cast<int32_t>(nl.numel()), qo.data_ptr<int32_t>(), vi.data_ptr<int32_t>(),
                            vn.data_ptr<int32_t>(), static_cast<int32_t>(qo.numel() - 1),
                            as_i32(page_size, "page_size"), as_i32(group, "group"), as_i32(head_dim, "head_dim"),
                            as_i32(kv_elem_size, "kv_elem_size"),
                            as_i32(max_absorbed_tokens, "max_absorbed_tokens"), &f);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  std::vector<at::Tensor> ts;
  for (const std::vector<int32_t>* v : {&f.node_page_indptr, &f.node_page_indices, &f.node_len, &f.vis_indptr,
                                        &f.vis_nodes}) {
    ts.push_back(int32_tensor(*v, any ? -1 : 0));
  }
  return ts;
}

// Block tables -> forest (csrc/block_tables.cpp): ([node_page_indptr, node_page_indices, node_len,
// qo_indptr, vis_indptr, vis_nodes, node_pos] int32 CPU tensors, [listed, unique, shared nodes, fallback]).
std::tuple<std::vector<at::Tensor>, std::vector<int64_t>> forest_from_block_table_op(
    const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
    int64_t block_size, bool share) {
  TORCH_CHECK(block_table.dim() == 2, "block_table: expected a 2-D [requests, blocks] tensor, got ",
              block_table.dim(), "-D");
  // Any integer dtype (vLLM's are int32), on the host as int32; values must fit.
  const auto i32 = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()) &&
                    t.scalar_type() != at::kBool,
                name, ": expected an integer tensor, got ", t.scalar_type());
    at::Tensor h = t.to(at::Device(at::kCPU));
    if (h.scalar_type() != at::kInt) {
      TORCH_CHECK(h.numel() == 0 || (h.min().item<int64_t>() >= std::numeric_limits<int32_t>::min() &&
                                     h.max().item<int64_t>() <= std::numeric_limits<int32_t>::max()),
                  name, ": expected values that fit int32");
      h = h.to(at::kInt);
    }
    return h.contiguous();
  };
  TORCH_CHECK(seq_lens.dim() == 1, "seq_lens: expected a 1-D tensor, got ", seq_lens.dim(), "-D");
  const at::Tensor seq = i32(seq_lens, "seq_lens");
  const int64_t R = seq.numel();
  TORCH_CHECK(block_table.size(0) >= R, "block_table: expected at least len(seq_lens) = ", R, " rows, got ",
              block_table.size(0));
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.numel() >= R + 1,
              "query_start_loc: expected at least len(seq_lens) + 1 = ", R + 1, " entries");
  const at::Tensor qo = i32(query_start_loc.slice(0, 0, R + 1), "query_start_loc");
  at::Tensor tab = block_table.slice(0, 0, R);
  if (tab.device() != at::Device(at::kCPU) || tab.scalar_type() != at::kInt || tab.stride(1) != 1) {
    tab = i32(tab, "block_table");
  }
  TORCH_CHECK(block_size >= 1 && block_size <= std::numeric_limits<int32_t>::max(),
              "block_size: expected a positive int32, got ", block_size);
  TableForest f;
  try {
    forest_from_block_table(tab.data_ptr<int32_t>(), R > 1 ? tab.stride(0) : tab.size(1), tab.size(1),
                            static_cast<int32_t>(R), seq.data_ptr<int32_t>(), qo.data_ptr<int32_t>(),
                            static_cast<int32_t>(block_size), share, &f);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  std::vector<at::Tensor> ts;
  for (const std::vector<int32_t>* v : {&f.node_page_indptr, &f.node_page_indices, &f.node_len, &f.qo_indptr,
                                        &f.vis_indptr, &f.vis_nodes, &f.node_pos}) {
    ts.push_back(int32_tensor(*v));
  }
  return {ts, {f.listed_blocks, f.unique_blocks, f.shared_nodes, f.fallback ? 1 : 0}};
}

// [selected, supported] CPU micro-kernel ISA (multiverse::cpu::CpuIsa values): what tree_attention
// and tree_attention_backward run now (MULTIVERSE_CPU_ISA applied) and the widest this CPU supports.
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
      "int num_workers=1, Tensor? node_pos=None, int window=0) -> (Tensor[], Tensor)");
  // Tiny-node absorption (csrc/absorb.cpp), identical to multiverse_kernels.absorption's torch code:
  // the rewritten [node_page_indptr, node_page_indices, node_len, vis_indptr, vis_nodes] as int32 CPU
  // tensors, or 5 empty tensors when nothing is absorbed. Eager only (data-dependent sizes).
  m.def(
      "absorb_tiny_nodes(Tensor node_page_indptr, Tensor node_page_indices, Tensor node_len, "
      "Tensor qo_indptr, Tensor vis_indptr, Tensor vis_nodes, int page_size, int group, int head_dim, "
      "int kv_elem_size, int max_absorbed_tokens=8) -> Tensor[]");
  // A paged engine's block tables -> forest (csrc/block_tables.cpp), identical to
  // multiverse_kernels.integrations.vllm_sharing's torch code: ([node_page_indptr, node_page_indices,
  // node_len, qo_indptr, vis_indptr, vis_nodes, node_pos] int32 CPU tensors, [listed blocks, unique blocks,
  // shared nodes, fallback]). Eager only (data-dependent sizes).
  m.def(
      "forest_from_block_table(Tensor block_table, Tensor seq_lens, Tensor query_start_loc, int block_size, "
      "bool share=True) -> (Tensor[], int[])");
  // The plan field lists this library was built with (multiverse_kernels/plan_format.py FORMAT_STRING).
  m.def("plan_format() -> str");
  // Run step of tree attention over a plan (TreePlan.tensors(), TreePlan.ints()); kv_bytes: optional
  // int64[1] the kernel adds the K+V bytes it loads to (measurement hook). The plan's reader_lo (when
  // its window is set) bounds each reader's keys from below; softcap > 0: s = softcap tanh(s / softcap).
  // fp8 caches (float8_e4m3fn / float8_e5m2, float16 / bfloat16 q) need k_scale and v_scale: float32
  // [1] (per tensor) or [num_kv_heads] (per KV head), both the same shape; key = cache value * k_scale.
  m.def(
      "tree_attention_run(Tensor q, Tensor k_cache, Tensor v_cache, Tensor node_page_indptr, "
      "Tensor node_page_indices, Tensor[] plan_tensors, int[] plan_ints, float sm_scale, "
      "Tensor(a!)? kv_bytes=None, float softcap=0.0, Tensor? k_scale=None, Tensor? v_scale=None) "
      "-> (Tensor, Tensor)");
  // Backward of tree_attention_run over the same plan: (dq, dk_cache, dv_cache) like q and the caches.
  m.def(
      "tree_attention_backward_run(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k_cache, "
      "Tensor v_cache, Tensor out, Tensor lse, Tensor node_page_indptr, Tensor node_page_indices, "
      "Tensor[] plan_tensors, int[] plan_ints, float sm_scale, float softcap=0.0) -> (Tensor, Tensor, Tensor)");
  m.def("merge_states(Tensor v, Tensor s) -> (Tensor, Tensor)");
  // [selected, supported] micro-kernel ISA of the CPU tree_attention (0 baseline, 1 avx2, 2 avx512).
  m.def("cpu_isa() -> int[]", &multiverse::bind::cpu_isa_op);
  // FMA rate (flop/s) of the selected ISA on ATen's thread pool (at::get_num_threads() workers).
  m.def("cpu_fma_peak(int iters) -> float", [](int64_t iters) {
    return multiverse::cpu::cpu_fma_peak(iters, at::get_num_threads());
  });
  m.def(
      "append_paged_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor page_indptr, "
      "Tensor page_indices, Tensor token_node, Tensor token_pos) -> ()");
  // The same copy addressed by a paged engine's flat slot mapping (vLLM's reshape_and_cache): row i of
  // k / v [n, Hk, D] -> page slot_mapping[i] // page_size, row slot_mapping[i] % page_size of the caches
  // [num_pages, page_size, Hk, D] (any strides, head_dim contiguous); int64 slots, < 0 not written.
  m.def(
      "append_kv_slots(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(multiverse_C, CompositeExplicitAutograd, m) {
  m.impl("plan_tree_attention", &multiverse::bind::plan_tree_attention_op);
  m.impl("absorb_tiny_nodes", &multiverse::bind::absorb_tiny_nodes_op);
  m.impl("forest_from_block_table", &multiverse::bind::forest_from_block_table_op);
  m.impl("plan_format", []() -> std::string { return MULTIVERSE_PLAN_FORMAT; });
}

TORCH_LIBRARY_IMPL(multiverse_C, CPU, m) {
  m.impl("tree_attention", &multiverse::bind::tree_attention_cpu);
  m.impl("tree_attention_run", &multiverse::bind::tree_attention_run_cpu);
  m.impl("tree_attention_backward_run", &multiverse::bind::tree_attention_backward_run_cpu);
  m.impl("merge_states", &multiverse::bind::merge_states_cpu);
  m.impl("append_paged_kv", &multiverse::bind::append_paged_kv_cpu);
  m.impl("append_kv_slots", &multiverse::bind::append_kv_slots_cpu);
}
