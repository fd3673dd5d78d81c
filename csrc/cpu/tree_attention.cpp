// DRIVER (forward): CPU tree attention over a plan (docs/plan.md): one task per (work item, KV head), or
// per (work item, group of KV heads) where every item is light (heads_per_task), pulled by worker
// threads from a shared counter, each with its per-thread scratch (owned here). The task itself is the
// selected ISA's forward kernel (tree_attention_fwd_impl.h, compiled once per ISA by kernels_*.cpp),
// called through the one dispatch (isa_dispatch.cpp: cpu_isa_kernels(), cpuid capped by
// MULTIVERSE_CPU_ISA).
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "isa_kernels.h"
#include "multiverse/cpu_kernels.h"
#include "multiverse/index_math.h"
#include "parallel.h"

namespace multiverse::cpu {
namespace {

struct Scratch {
  std::vector<float> f;
  std::vector<int32_t> i;
  TaskScratch view(int64_t tokens, int32_t head_dim, int32_t rows) {
    const int64_t nf = task_scratch_floats(tokens, head_dim);
    const int64_t ni = task_row_ints(rows);
    if (static_cast<int64_t>(f.size()) < nf + kAlignFloats) f.resize(nf + kAlignFloats);
    if (static_cast<int64_t>(i.size()) < ni) i.resize(ni);
    const int64_t tp = task_tokens_pad(tokens);
    const int64_t dp = round_up64(head_dim, kDimPad);
    TaskScratch s;
    s.kv = align64(f.data());
    s.qt = s.kv + 2 * tp * dp;
    s.st = s.qt + static_cast<int64_t>(head_dim) * kRowBlock;
    s.p2 = reinterpret_cast<uint32_t*>(s.st + static_cast<int64_t>(kTokenBlock) * kRowBlock);
    s.o = s.st + static_cast<int64_t>(kTokenBlock) * kRowBlock + kTokenBlock / 2 * kRowBlock;
    s.mx = s.o + kRowBlock * dp;
    s.sum = s.mx + kRowBlock;
    s.alpha = s.sum + kRowBlock;
    s.heads = s.alpha + kRowBlock;
    s.rows = i.data();
    return s;
  }
};

// KV heads per task of FwdHeadsFn tasks, 0 for one-head FwdTaskFn tasks. FwdHeadsFn where the ISA has
// them (AVX2, AVX-512) and every item is one for them (caches in q's dtype, not fp8; head_dim a multiple
// of the ISA's vector width, IsaKernels::heads_dim_multiple; at most
// kHeadsRows packed rows: a lone sequence, independent sequences, small sampling groups): then the most
// heads (a power of two dividing num_kv_heads, <= kMaxTaskHeads) that keeps the largest task within an
// even share of the step's work over the workers, at least 1. Results do not depend on the count
// (task_heads: per head the arithmetic of a one-head task), so neither on the thread count.
int32_t heads_per_task(const TreeAttentionParams& p, const IsaKernels& k, int32_t group) {
  if (k.fwd_heads == nullptr || dtype_is_fp8(p.kv_dtype) || p.head_dim % k.heads_dim_multiple != 0) return 0;
  int64_t total = 0, longest = 0;
  for (int32_t it = 0; it < p.num_items; ++it) {
    if (static_cast<int64_t>(p.item_num_readers[it]) * group > kHeadsRows) return 0;
    total += p.item_kv_len[it];
    longest = std::max<int64_t>(longest, p.item_kv_len[it]);
  }
  const int64_t workers = worker_count(static_cast<int64_t>(p.num_items) * p.num_kv_heads);
  int32_t nh = 1;
  for (int32_t h = 2; h <= kMaxTaskHeads && p.num_kv_heads % h == 0; h *= 2)
    if (longest * h * workers <= total * p.num_kv_heads) nh = h;
  return nh;
}

}  // namespace

void tree_attention(const TreeAttentionParams& p) {
  // q is fp32 / fp16 / bf16; fp8 caches (kv_dtype) take fp16 / bf16 q and their scales (params.h). The
  // per-ISA tasks assume it.
  if (dtype_is_fp8(p.dtype))
    throw std::invalid_argument("tree_attention: q's dtype (TreeAttentionParams::dtype) must be float32, "
                                "float16 or bfloat16; fp8 is a KV-cache dtype (kv_dtype)");
  if (dtype_is_fp8(p.kv_dtype)) {
    if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
      throw std::invalid_argument("tree_attention: an fp8 KV cache (kv_dtype) takes float16 or bfloat16 q");
    if (p.k_scale == nullptr || p.v_scale == nullptr)
      throw std::invalid_argument("tree_attention: an fp8 KV cache (kv_dtype) needs k_scale and v_scale");
  }
  const FwdTaskFn fn = cpu_isa_kernels().fwd_task;
  const FwdHeadsFn fn_heads = cpu_isa_kernels().fwd_heads;
  const int32_t group = gqa_group(p.num_qo_heads, p.num_kv_heads);
  const int32_t hk = p.num_kv_heads;
  const int32_t nh = heads_per_task(p, cpu_isa_kernels(), group);
  const int32_t per_item = hk / (nh > 0 ? nh : 1);  // tasks per item
  const int64_t tasks = static_cast<int64_t>(p.num_items) * per_item;
  // A task's cost for the queue's look-ahead rule (parallel.h): its chunk's tokens x (its packed rows +
  // kCostRows), between a memory-bound task's (tokens) and a compute-bound one's (tokens x rows).
  // item_after[it]: the summed cost of items it .. num_items - 1, each per_item tasks of one cost.
  constexpr int64_t kCostRows = 16;
  thread_local std::vector<int64_t> item_after;
  item_after.assign(static_cast<size_t>(p.num_items) + 1, 0);
  for (int32_t it = p.num_items - 1; it >= 0; --it)
    item_after[it] = item_after[it + 1] + hk * static_cast<int64_t>(p.item_kv_len[it]) *
                                              (p.item_num_readers[it] * group + kCostRows);
  const int64_t* after = item_after.data();
  auto suffix_cost = [after, per_item, tasks](int64_t i) -> int64_t {  // tasks i .. tasks - 1
    if (i >= tasks) return 0;
    const int64_t it = i / per_item;
    return after[it + 1] + (per_item - i % per_item) * ((after[it] - after[it + 1]) / per_item);
  };
  if (nh > 0) {  // tasks of nh KV heads (each prefetches its own next blocks, not the next task's)
    parallel_tasks_lookahead<Scratch>(tasks, [&](int64_t i, int64_t, Scratch& sc) {
      const int32_t item = static_cast<int32_t>(i / per_item);
      const TaskScratch s = sc.view(p.item_kv_len[item], p.head_dim, p.item_num_readers[item] * group);
      const int64_t bytes = fn_heads(p, item, static_cast<int32_t>(i % per_item) * nh, nh, s);
      if (p.kv_bytes_loaded != nullptr && bytes > 0)
        __atomic_fetch_add(p.kv_bytes_loaded, bytes, __ATOMIC_RELAXED);
    }, suffix_cost);
    return;
  }
  // Otherwise one task per (item, KV head), in plan order (a node's chunks and heads together); each
  // worker prefetches the chunk of the task it runs next while computing the current one, so a
  // compute-bound task hides the loads of the next (possibly memory-bound) one.
  parallel_tasks_lookahead<Scratch>(tasks, [&](int64_t i, int64_t next, Scratch& sc) {
    const int64_t t = i;
    const int32_t item = static_cast<int32_t>(t / hk);
    const int32_t kh = static_cast<int32_t>(t % hk);
    const int64_t tn = next;
    const TaskScratch s = sc.view(p.item_kv_len[item], p.head_dim, p.item_num_readers[item] * group);
    const int64_t bytes = fn(p, item, kh, tn >= 0 ? static_cast<int32_t>(tn / hk) : -1,
                             tn >= 0 ? static_cast<int32_t>(tn % hk) : 0, s);
    if (p.kv_bytes_loaded != nullptr && bytes > 0)
      __atomic_fetch_add(p.kv_bytes_loaded, bytes, __ATOMIC_RELAXED);
  }, suffix_cost);
}

}  // namespace multiverse::cpu
