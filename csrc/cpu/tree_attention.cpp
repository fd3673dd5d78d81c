// DRIVER (forward): CPU tree attention over a plan (docs/plan.md): one task per (work item, KV head),
// pulled by worker threads from a shared counter, each with its per-thread scratch (owned here). The
// task itself is the selected ISA's forward kernel (tree_attention_fwd_impl.h, compiled once per ISA by
// kernels_*.cpp), called through the one dispatch (isa_dispatch.cpp:
// cpu_isa_kernels(), cpuid capped by MULTIVERSE_CPU_ISA).
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
    s.rows = i.data();
    return s;
  }
};

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
  const int32_t group = gqa_group(p.num_qo_heads, p.num_kv_heads);
  const int32_t hk = p.num_kv_heads;
  const int64_t tasks = static_cast<int64_t>(p.num_items) * hk;
  // A task's cost for the queue's look-ahead rule (parallel.h): its chunk's tokens x (its packed rows +
  // kCostRows), between a memory-bound task's (tokens) and a compute-bound one's (tokens x rows).
  // item_after[it]: the summed cost of items it .. num_items - 1, each hk tasks of one cost.
  constexpr int64_t kCostRows = 16;
  thread_local std::vector<int64_t> item_after;
  item_after.assign(static_cast<size_t>(p.num_items) + 1, 0);
  for (int32_t it = p.num_items - 1; it >= 0; --it)
    item_after[it] = item_after[it + 1] + hk * static_cast<int64_t>(p.item_kv_len[it]) *
                                              (p.item_num_readers[it] * group + kCostRows);
  const int64_t* after = item_after.data();
  auto suffix_cost = [after, hk, tasks](int64_t i) -> int64_t {  // tasks i .. tasks - 1
    if (i >= tasks) return 0;
    const int64_t it = i / hk;
    return after[it + 1] + (hk - i % hk) * ((after[it] - after[it + 1]) / hk);
  };
  // Tasks in plan order (a node's chunks and heads together); each worker prefetches the chunk of the
  // task it runs next while computing the current one, so a compute-bound task hides the loads of the
  // next (possibly memory-bound) one.
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
