// Helpers shared by the torch binding files: argument checks naming the argument, dtype mapping,
// and filling the params structs from tensors.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <utility>
#include <vector>
#include <limits>

#include "multiverse/params.h"
#include "multiverse/plan.h"

namespace multiverse::bind {

// MULTIVERSE_DEBUG_POISON=1: outputs and workspaces are filled with NaN before the kernels run, so a
// test sees any element a kernel does not write (read per call; tests toggle it).
inline bool poison_outputs() {
  const char* v = std::getenv("MULTIVERSE_DEBUG_POISON");
  return v != nullptr && v[0] == '1';
}

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline bool is_fp8(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

// The caches' DType: q's (any of to_dtype's), or fp8 (float8_e4m3fn / float8_e5m2).
inline DType to_kv_dtype(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat8_e4m3fn) return DType::kFloat8E4M3;
  if (t.scalar_type() == at::kFloat8_e5m2) return DType::kFloat8E5M2;
  return to_dtype(t, name);
}

// One dequantization scale of an fp8 cache (k_scale / v_scale): float32 [1] or [num_kv_heads].
inline const float* check_kv_scale(const std::optional<at::Tensor>& s, const char* name, int64_t hk,
                                   const at::Tensor& k_cache, const at::Device& dev) {
  TORCH_CHECK(s.has_value(), name, ": an fp8 KV cache (", k_cache.scalar_type(),
              ") needs float32 scales k_scale and v_scale of shape [1] or [num_kv_heads] = [", hk,
              "] (key = cache value * scale)");
  TORCH_CHECK(s->scalar_type() == at::kFloat, name, ": expected float32, got ", s->scalar_type());
  TORCH_CHECK(s->dim() == 1 && (s->size(0) == 1 || s->size(0) == hk), name,
              ": expected shape [1] (per tensor) or [", hk, "] (per KV head), got ", s->sizes());
  TORCH_CHECK(s->is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK(s->device() == dev, name, ": expected device ", dev, " (like q), got ", s->device());
  return s->data_ptr<float>();
}

inline void check_i32(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, ": expected a 1-D tensor, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK(t.device() == dev, name, ": expected device ", dev, " (like q), got ", t.device());
}

inline const int32_t* i32(const at::Tensor& t) { return t.data_ptr<int32_t>(); }

// A 1-D int32 index tensor copied to the host (if it is not there) and checked: what the host planner
// and tiny-node absorption read.
inline at::Tensor host_i32(const at::Tensor& t, const char* name) {
  const auto cpu = at::Device(at::kCPU);
  at::Tensor h = t.to(cpu).contiguous();
  check_i32(h, name, cpu);
  return h;
}

// A host int32 tensor holding `v` (the host ops' list outputs); `n` elements of it (default: all).
inline at::Tensor int32_tensor(const std::vector<int32_t>& v, int64_t n = -1) {
  const int64_t len = n < 0 ? static_cast<int64_t>(v.size()) : n;
  at::Tensor t = at::empty({len}, at::TensorOptions().dtype(at::kInt));
  std::copy(v.begin(), v.begin() + len, t.data_ptr<int32_t>());
  return t;
}

// The plan fields in TreePlan.TENSOR_FIELDS / INT_FIELDS order (multiverse_kernels/plan_format.py, via
// the generated multiverse/plan_fields.h): PlanT::reader_row, ..., PlanI::num_readers, ...
namespace PlanT {
enum : int {
#define MULTIVERSE_X(name) name,
  MULTIVERSE_PLAN_TENSOR_FIELDS(MULTIVERSE_X)
#undef MULTIVERSE_X
  kCount
};
}  // namespace PlanT
namespace PlanI {
enum : int {
#define MULTIVERSE_X(name) name,
  MULTIVERSE_PLAN_INT_FIELDS(MULTIVERSE_X)
#undef MULTIVERSE_X
  kCount
};
}  // namespace PlanI
inline const char* const kPlanTensorNames[] = {
#define MULTIVERSE_X(name) #name,
    MULTIVERSE_PLAN_TENSOR_FIELDS(MULTIVERSE_X)
#undef MULTIVERSE_X
};
constexpr int kNumPlanTensors = PlanT::kCount;
constexpr int kNumPlanInts = PlanI::kCount;

// Validates shapes/dtypes and fills everything but the output/workspace pointers. The caches have q's
// dtype, or are fp8 (float8_e4m3fn / float8_e5m2, both the same) with float16 / bfloat16 q and then need
// k_scale and v_scale (float32 [1] or [num_kv_heads], the same shape; params.h kv_dtype); scales
// without fp8 caches are refused.
inline TreeAttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& node_page_indptr,
                                                 const at::Tensor& node_page_indices, at::TensorList plan,
                                                 at::IntArrayRef ints, double sm_scale,
                                                 const std::optional<at::Tensor>& k_scale = std::nullopt,
                                                 const std::optional<at::Tensor>& v_scale = std::nullopt) {
  TORCH_CHECK(plan.size() == kNumPlanTensors, "plan_tensors: expected ", int(kNumPlanTensors),
              " tensors (TreePlan.tensors()), got ", plan.size());
  TORCH_CHECK(ints.size() == kNumPlanInts, "plan_ints: expected ", int(kNumPlanInts),
              " ints (TreePlan.ints()), got ", ints.size());
  TORCH_CHECK(q.dim() == 3, "q: expected [total_q, Hq, D], got ", q.dim(), "-D");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "k_cache: expected [num_pages, page_size, Hk, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "v_cache: expected the shape of k_cache");
  const bool fp8 = is_fp8(k_cache.scalar_type()) || is_fp8(v_cache.scalar_type());
  if (fp8) {
    TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache: expected the dtype of k_cache (",
                k_cache.scalar_type(), "), got ", v_cache.scalar_type());
    TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "q: an fp8 KV cache (",
                k_cache.scalar_type(), ") takes float16 or bfloat16 queries, got ", q.scalar_type());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                "k_cache: expected the dtype of q (", q.scalar_type(), "; or fp8 with float16 / bfloat16 q), got ",
                k_cache.scalar_type(), " and v_cache ", v_cache.scalar_type());
    TORCH_CHECK(!k_scale.has_value() && !v_scale.has_value(), k_scale.has_value() ? "k_scale" : "v_scale",
                ": scales are for fp8 KV caches (float8_e4m3fn / float8_e5m2), got k_cache of dtype ",
                k_cache.scalar_type());
  }
  TORCH_CHECK(k_cache.size(3) == q.size(2), "k_cache: expected head_dim ", q.size(2), " like q");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "q: expected the head_dim axis contiguous (q, k_cache, v_cache)");
  const auto dev = q.device();
  TORCH_CHECK(k_cache.device() == dev && v_cache.device() == dev, "k_cache: expected q's device");
  const int64_t hq = q.size(1), hk = k_cache.size(2);
  TORCH_CHECK(hk > 0 && hq % hk == 0, "k_cache: expected num_kv_heads dividing num_qo_heads = ", hq);
  check_i32(node_page_indptr, "node_page_indptr", dev);
  check_i32(node_page_indices, "node_page_indices", dev);
  for (int i = 0; i < kNumPlanTensors; ++i) check_i32(plan[i], kPlanTensorNames[i], dev);
  TORCH_CHECK(plan[PlanT::row_partial_indptr].numel() == q.size(0) + 1,
              "row_partial_indptr: expected total_q + 1 = ", q.size(0) + 1, " entries, got ",
              plan[PlanT::row_partial_indptr].numel());
  TORCH_CHECK(ints[PlanI::workspace_slots] >= ints[PlanI::num_partials] && ints[PlanI::num_partials] >= 0,
              "plan_ints: expected workspace_slots >= num_partials >= 0");
  TreeAttentionParams p{};
  p.kv_dtype = to_kv_dtype(k_cache, "k_cache");
  p.k_scale = p.v_scale = nullptr;
  p.kv_scale_per_head = 0;
  if (fp8) {
    p.k_scale = check_kv_scale(k_scale, "k_scale", hk, k_cache, dev);
    p.v_scale = check_kv_scale(v_scale, "v_scale", hk, k_cache, dev);
    TORCH_CHECK(k_scale->size(0) == v_scale->size(0), "v_scale: expected the shape of k_scale (",
                k_scale->sizes(), "; both per tensor [1] or both per KV head [", hk, "]), got ", v_scale->sizes());
    p.kv_scale_per_head = k_scale->size(0) > 1 ? 1 : 0;
  }
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.node_page_indptr = i32(node_page_indptr);
  p.node_page_indices = i32(node_page_indices);
  p.reader_row = i32(plan[PlanT::reader_row]);
  p.reader_limit = i32(plan[PlanT::reader_limit]);
  // reader_lo is all 0 without a window (plan_ints window == 0): the kernels then skip the lower bound
  p.reader_lo = ints[PlanI::window] > 0 ? i32(plan[PlanT::reader_lo]) : nullptr;
  p.item_node = i32(plan[PlanT::item_node]);
  p.item_kv_start = i32(plan[PlanT::item_kv_start]);
  p.item_kv_len = i32(plan[PlanT::item_kv_len]);
  p.item_reader_start = i32(plan[PlanT::item_reader_start]);
  p.item_num_readers = i32(plan[PlanT::item_num_readers]);
  p.item_partial_start = i32(plan[PlanT::item_partial_start]);
  p.row_partial_indptr = i32(plan[PlanT::row_partial_indptr]);
  p.q_stride_row = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.k_stride_page = k_cache.stride(0);
  p.k_stride_slot = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_stride_page = v_cache.stride(0);
  p.v_stride_slot = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  // Padded (capacity) plans: run every item buffer entry; padding items have 0 readers.
  p.num_items = static_cast<int32_t>(plan[PlanT::item_node].numel());
  p.num_qo_heads = static_cast<int32_t>(hq);
  p.num_kv_heads = static_cast<int32_t>(hk);
  p.head_dim = static_cast<int32_t>(q.size(2));
  p.page_size = static_cast<int32_t>(k_cache.size(1));
  p.max_chunk_tokens = static_cast<int32_t>(ints[PlanI::chunk_tokens]);
  p.max_readers = static_cast<int32_t>(ints[PlanI::rows_per_tile]);
  p.sm_scale = static_cast<float>(sm_scale);
  p.dtype = to_dtype(q, "q");
  p.kv_bytes_loaded = nullptr;
  return p;
}

// Output, lse and the fp32 partial-state workspace of one tree_attention run (sized from q and the
// plan), poisoned when asked; sets the params' output pointers and, if given, the kernel's byte counter
// (an int64 [1] tensor on q's device).
struct AttentionBuffers {
  at::Tensor out, lse, partial_out, partial_lse;
};

inline AttentionBuffers alloc_attention_buffers(TreeAttentionParams& p, const at::Tensor& q,
                                                at::IntArrayRef ints,
                                                const std::optional<at::Tensor>& kv_bytes) {
  const int64_t total_q = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t slots = ints[PlanI::workspace_slots];
  const auto f32 = q.options().dtype(at::kFloat);
  AttentionBuffers b{at::empty({total_q, hq, d}, q.options()), at::empty({total_q, hq}, f32),
                     at::empty({slots, hq, d}, f32), at::empty({slots, hq}, f32)};
  if (poison_outputs()) {  // tests: every element the kernels fail to write stays NaN
    for (at::Tensor* t : {&b.out, &b.lse, &b.partial_out, &b.partial_lse}) {
      t->fill_(std::numeric_limits<float>::quiet_NaN());
    }
  }
  p.out = b.out.data_ptr();
  p.lse = b.lse.data_ptr<float>();
  p.partial_out = b.partial_out.data_ptr<float>();
  p.partial_lse = b.partial_lse.data_ptr<float>();
  if (kv_bytes.has_value()) {
    TORCH_CHECK(kv_bytes->scalar_type() == at::kLong && kv_bytes->numel() == 1 &&
                    kv_bytes->device() == q.device(),
                "kv_bytes: expected an int64 tensor with one element on q's device");
    p.kv_bytes_loaded = kv_bytes->data_ptr<int64_t>();
  }
  return b;
}

// Output and lse of merge_states for v [N, S, H, D], poisoned when asked.
inline std::pair<at::Tensor, at::Tensor> alloc_merge_outputs(const at::Tensor& v) {
  auto out = at::empty({v.size(0), v.size(2), v.size(3)}, v.options());
  auto lse = at::empty({v.size(0), v.size(2)}, v.options().dtype(at::kFloat));
  if (poison_outputs()) {
    out.fill_(std::numeric_limits<float>::quiet_NaN());
    lse.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  return {out, lse};
}

inline MergeParams make_plan_merge_params(const TreeAttentionParams& a, at::TensorList plan,
                                          const at::Tensor& out, const at::Tensor& lse) {
  MergeParams m{};
  m.partial_out = a.partial_out;
  m.partial_lse = a.partial_lse;
  m.row_partial_indptr = i32(plan[PlanT::row_partial_indptr]);
  m.row_partial_indices = i32(plan[PlanT::row_partial_indices]);
  m.merge_rows = i32(plan[PlanT::merge_rows]);
  m.out = out.data_ptr();
  m.lse = lse.data_ptr<float>();
  m.num_rows = static_cast<int32_t>(plan[PlanT::merge_rows].numel());
  m.num_heads = a.num_qo_heads;
  m.head_dim = a.head_dim;
  m.v_dtype = DType::kFloat32;
  m.out_dtype = a.dtype;
  return m;
}

inline MergeParams make_merge_params(const at::Tensor& v, const at::Tensor& s, const at::Tensor& out,
                                     const at::Tensor& lse) {
  TORCH_CHECK(v.dim() == 4, "v: expected [N, num_states, H, D], got ", v.dim(), "-D");
  TORCH_CHECK(s.dim() == 3 && s.size(0) == v.size(0) && s.size(1) == v.size(1) && s.size(2) == v.size(2),
              "s: expected shape [N, num_states, H] matching v");
  TORCH_CHECK(s.scalar_type() == at::kFloat, "s: expected float32, got ", s.scalar_type());
  TORCH_CHECK(v.is_contiguous() && s.is_contiguous(), "v: expected contiguous v and s");
  TORCH_CHECK(s.device() == v.device(), "s: expected v's device");
  MergeParams m{};
  m.partial_out = nullptr;
  m.partial_out_any = v.data_ptr();
  m.partial_lse = s.data_ptr<float>();
  m.out = out.data_ptr();
  m.lse = lse.data_ptr<float>();
  m.num_rows = static_cast<int32_t>(v.size(0));
  m.num_states = static_cast<int32_t>(v.size(1));
  m.num_heads = static_cast<int32_t>(v.size(2));
  m.head_dim = static_cast<int32_t>(v.size(3));
  m.v_dtype = to_dtype(v, "v");
  m.out_dtype = m.v_dtype;
  return m;
}

// The rows and caches of an append (both modes); the destination fields are the caller's.
inline AppendParams make_append_rows(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k: expected [n, Hk, D] with v of the same shape");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "k_cache: expected [num_pages, page_size, Hk, D] with v_cache of the same shape");
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3),
              "k: expected heads and head_dim of k_cache");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "k: expected the head_dim axis contiguous (k, v, k_cache, v_cache)");
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "v: expected the dtype of k");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache: expected the dtype of k_cache");
  const auto dev = k.device();
  TORCH_CHECK(v.device() == dev && k_cache.device() == dev && v_cache.device() == dev,
              "k_cache: expected k's device");
  AppendParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_stride_tok = k.stride(0);
  p.k_stride_head = k.stride(1);
  p.v_stride_tok = v.stride(0);
  p.v_stride_head = v.stride(1);
  p.kc_stride_page = k_cache.stride(0);
  p.kc_stride_slot = k_cache.stride(1);
  p.kc_stride_head = k_cache.stride(2);
  p.vc_stride_page = v_cache.stride(0);
  p.vc_stride_slot = v_cache.stride(1);
  p.vc_stride_head = v_cache.stride(2);
  p.num_tokens = static_cast<int32_t>(k.size(0));
  p.num_kv_heads = static_cast<int32_t>(k.size(1));
  p.head_dim = static_cast<int32_t>(k.size(2));
  p.page_size = static_cast<int32_t>(k_cache.size(1));
  p.src_dtype = to_dtype(k, "k");
  p.cache_dtype = to_dtype(k_cache, "k_cache");
  return p;
}

// append_paged_kv: token i -> slot token_pos[i] of node token_node[i].
inline AppendParams make_append_params(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const at::Tensor& page_indptr,
                                       const at::Tensor& page_indices, const at::Tensor& token_node,
                                       const at::Tensor& token_pos) {
  AppendParams p = make_append_rows(k, v, k_cache, v_cache);
  const auto dev = k.device();
  check_i32(page_indptr, "page_indptr", dev);
  check_i32(page_indices, "page_indices", dev);
  check_i32(token_node, "token_node", dev);
  check_i32(token_pos, "token_pos", dev);
  TORCH_CHECK(token_node.numel() == k.size(0) && token_pos.numel() == k.size(0),
              "token_node: expected one entry per row of k");
  p.page_indptr = i32(page_indptr);
  p.page_indices = i32(page_indices);
  p.token_node = i32(token_node);
  p.token_pos = i32(token_pos);
  return p;
}

// append_kv_slots: token i -> flat slot slots[i] (page * page_size + row; < 0: not written). int64
// slots on k's device, one per row of k; on CPU each is checked against the cache's num_pages x
// page_size slots (on CUDA not: that would sync).
inline AppendParams make_slot_append_params(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                            const at::Tensor& v_cache, const at::Tensor& slots) {
  AppendParams p = make_append_rows(k, v, k_cache, v_cache);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.device() == k.device(),
              "slot_mapping: expected a 1-D int64 tensor on k's device, got ", slots.scalar_type(), " ",
              slots.dim(), "-D on ", slots.device());
  TORCH_CHECK(slots.numel() == k.size(0), "slot_mapping: expected one entry per row of k (", k.size(0),
              "), got ", slots.numel());
  TORCH_CHECK(slots.stride(0) == 1 || slots.numel() <= 1, "slot_mapping: expected a contiguous tensor");
  p.slots = slots.data_ptr<int64_t>();
  if (slots.device().is_cpu()) {
    const int64_t n_slots = k_cache.size(0) * k_cache.size(1);
    for (int64_t i = 0; i < slots.numel(); ++i) {
      TORCH_CHECK(p.slots[i] < n_slots, "slot_mapping: slot ", p.slots[i], " of row ", i,
                  " is past the cache's num_pages x page_size = ", n_slots, " slots");
    }
  }
  return p;
}

// Plans on the host (metadata copied to the CPU if needed) and returns the plan as int32 tensors on
// `device`, in TreePlan.TENSOR_FIELDS order, plus the ints in TreePlan.INT_FIELDS order.
inline std::pair<std::vector<at::Tensor>, std::vector<int64_t>> host_plan(
    const at::Tensor& node_len, const at::Tensor& qo_indptr, const at::Tensor& vis_indptr,
    const at::Tensor& vis_nodes, const std::optional<at::Tensor>& own_full, int64_t chunk_tokens,
    int64_t rows_per_tile, int64_t group, int64_t num_kv_heads, int64_t num_workers, const at::Device& device,
    const std::optional<at::Tensor>& node_pos = std::nullopt, int64_t window = 0) {
  const auto cpu = at::Device(at::kCPU);
  const at::Tensor nl = host_i32(node_len, "node_len"), qo = host_i32(qo_indptr, "qo_indptr");
  const at::Tensor vi = host_i32(vis_indptr, "vis_indptr"), vn = host_i32(vis_nodes, "vis_nodes");
  TORCH_CHECK(vi.numel() == qo.numel() && qo.numel() >= 1, "vis_indptr: expected the length of qo_indptr");
  const int64_t groups = qo.numel() - 1;
  at::Tensor of;
  if (own_full.has_value()) {
    of = own_full->to(cpu).to(at::kBool).contiguous();
    TORCH_CHECK(of.numel() == groups, "own_full: expected one flag per group (", groups, ")");
  }
  at::Tensor np;
  if (window > 0) {
    TORCH_CHECK(node_pos.has_value(), "node_pos: a window needs the nodes' start positions");
    np = host_i32(*node_pos, "node_pos");
    TORCH_CHECK(np.numel() == nl.numel(), "node_pos: expected one start position per node (", nl.numel(), ")");
  }
  TORCH_CHECK(window >= 0 && window <= INT32_MAX, "window: expected a positive int (0: none)");
  HostPlan hp;
  try {
    hp = plan_tree_attention(nl.data_ptr<int32_t>(), static_cast<int32_t>(nl.numel()), qo.data_ptr<int32_t>(),
                             vi.data_ptr<int32_t>(), vn.data_ptr<int32_t>(), static_cast<int32_t>(groups),
                             of.defined() ? of.data_ptr<bool>() : nullptr, static_cast<int32_t>(chunk_tokens),
                             static_cast<int32_t>(rows_per_tile), static_cast<int32_t>(group),
                             static_cast<int32_t>(num_kv_heads), static_cast<int32_t>(num_workers),
                             np.defined() ? np.data_ptr<int32_t>() : nullptr, static_cast<int32_t>(window));
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  // One host buffer for all tensors (one allocation, one copy to the device), split into views.
  const std::vector<int32_t>* fields[] = {
#define MULTIVERSE_X(name) &hp.name,
      MULTIVERSE_PLAN_TENSOR_FIELDS(MULTIVERSE_X)
#undef MULTIVERSE_X
  };
  // Each tensor starts on a 64-byte boundary (the kernels' JIT specializes on pointer alignment).
  constexpr int64_t kAlign = 16;
  int64_t total = 0;
  for (const auto* v : fields) total += (static_cast<int64_t>(v->size()) + kAlign - 1) / kAlign * kAlign;
  at::Tensor buf = at::empty({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(at::kInt));
  int32_t* base = buf.data_ptr<int32_t>();
  int64_t off = 0;
  for (const auto* v : fields) {
    std::copy(v->begin(), v->end(), base + off);
    off += (static_cast<int64_t>(v->size()) + kAlign - 1) / kAlign * kAlign;
  }
  if (!device.is_cpu()) buf = buf.to(device);
  std::vector<at::Tensor> ts;
  ts.reserve(kNumPlanTensors);
  off = 0;
  for (const auto* v : fields) {
    const int64_t n = static_cast<int64_t>(v->size());
    ts.push_back(buf.narrow(0, off, n));
    off += (n + kAlign - 1) / kAlign * kAlign;
  }
  return {ts, {
#define MULTIVERSE_X(name) hp.name,
      MULTIVERSE_PLAN_INT_FIELDS(MULTIVERSE_X)
#undef MULTIVERSE_X
  }};
}

}  // namespace multiverse::bind
