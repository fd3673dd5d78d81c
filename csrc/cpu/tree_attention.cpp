// CPU tree attention over a plan (docs/plan.md): one task per (work item, KV head), pulled by worker
// threads from a shared counter. This unit picks the micro-kernel build for the CPU at run time
// (cpuid; MULTIVERSE_CPU_ISA caps it) and owns the per-thread scratch; the kernels themselves live in
// tree_attention_impl.h, compiled once per ISA (tree_attention_{avx512,avx2,baseline}.cpp).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "multiverse/cpu_kernels.h"
#include "multiverse/index_math.h"
#include "parallel.h"
#include "tree_attention_kernels.h"

#if defined(MULTIVERSE_X86_ISAS)
#include <cpuid.h>
#endif

namespace multiverse::cpu {
namespace {

#if defined(MULTIVERSE_X86_ISAS)
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
#endif

CpuIsa detect_isa() {
#if defined(MULTIVERSE_X86_ISAS)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return CpuIsa::kBaseline;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(osxsave && avx && fma && f16c)) return CpuIsa::kBaseline;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return CpuIsa::kBaseline;  // OS saves xmm/ymm state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return CpuIsa::kBaseline;
  if (!(b & (1u << 5))) return CpuIsa::kBaseline;  // AVX2
  const bool f512 = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  if (f512 && dq && bw && vl && (xcr0 & 0xe0) == 0xe0) return CpuIsa::kAvx512;  // OS saves zmm/k state
  return CpuIsa::kAvx2;
#else
  return CpuIsa::kBaseline;
#endif
}

using FmaLoop = float (*)(int64_t, int64_t*);

// The functions one ISA build exports (tree_attention_{avx512,avx2,baseline}.cpp).
struct IsaKernels {
  TaskFn task;
  FmaLoop fma_loop;
};

IsaKernels isa_kernels(CpuIsa isa) {
  switch (isa) {
#if defined(MULTIVERSE_X86_ISAS)
    case CpuIsa::kAvx512: return {&tree_attention_task_avx512, &fma_loop_avx512};
    case CpuIsa::kAvx2: return {&tree_attention_task_avx2, &fma_loop_avx2};
#endif
    default: return {&tree_attention_task_baseline, &fma_loop_baseline};
  }
}

constexpr int64_t kAlignFloats = 64 / sizeof(float);

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
    // 64-byte aligned (a cache line): the packed rows' vector loads and stores never straddle two
    // lines (std::vector only guarantees 16 bytes; misaligned scratch cost 2-5% on the dev machine).
    s.kv = f.data() + (-(reinterpret_cast<uintptr_t>(f.data()) / sizeof(float)) & (kAlignFloats - 1));
    s.qt = s.kv + 2 * tp * dp;
    s.st = s.qt + static_cast<int64_t>(head_dim) * kRowBlock;
    s.o = s.st + static_cast<int64_t>(kTokenBlock) * kRowBlock;
    s.mx = s.o + kRowBlock * dp;
    s.sum = s.mx + kRowBlock;
    s.alpha = s.sum + kRowBlock;
    s.rows = i.data();
    return s;
  }
};

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

CpuIsa cpu_isa_supported() {
  static const CpuIsa isa = detect_isa();
  return isa;
}

CpuIsa cpu_isa_selected() {
  const CpuIsa best = cpu_isa_supported();
  const char* env = std::getenv("MULTIVERSE_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  const std::string v(env);
  CpuIsa want;
  if (v == "avx512") want = CpuIsa::kAvx512;
  else if (v == "avx2") want = CpuIsa::kAvx2;
  else if (v == "baseline") want = CpuIsa::kBaseline;
  else throw std::invalid_argument("MULTIVERSE_CPU_ISA=" + v + ": expected avx512, avx2 or baseline");
  if (static_cast<int>(want) > static_cast<int>(best))
    throw std::invalid_argument("MULTIVERSE_CPU_ISA=" + v + ": this CPU (or build) runs at most " +
                                cpu_isa_name(best));
  return want;
}

double cpu_fma_peak(int64_t iters, int64_t threads) {
  const FmaLoop fn = isa_kernels(cpu_isa_selected()).fma_loop;
  std::atomic<int64_t> flops{0};
  std::atomic<int64_t> sink{0};
  const auto t0 = std::chrono::steady_clock::now();
  run_workers(threads, [&]() {  // one loop per worker (parallel_tasks would let a worker claim two)
    int64_t f = 0;
    const float s = fn(iters, &f);
    flops += f;
    sink += static_cast<int64_t>(s != s);  // keep the result alive
  });
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sec > 0 ? static_cast<double>(flops.load()) / sec : 0.0;
}

void tree_attention(const TreeAttentionParams& p) {
  const TaskFn fn = isa_kernels(cpu_isa_selected()).task;
  const int32_t group = gqa_group(p.num_qo_heads, p.num_kv_heads);
  const int32_t hk = p.num_kv_heads;
  const int64_t tasks = static_cast<int64_t>(p.num_items) * hk;
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
  });
}

}  // namespace multiverse::cpu
