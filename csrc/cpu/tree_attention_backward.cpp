// DRIVER (backward): CPU backward of tree attention over the forward's plan (docs/api.md "Autograd";
// the specification is multiverse_kernels/backends/reference/tree_attention_backward.py). Runs the
// delta pass (delta = rowsum(dO * O) - grad_lse, parallel over query rows), then one task per
// (work item, KV head) pulled by worker threads from a shared counter, each with its per-thread scratch
// (owned here), and owns the striped spin locks under which the tasks add into dq / dk / dv. The delta
// rows and the tasks are the selected ISA's backward kernels (tree_attention_bwd_impl.h, compiled once
// per ISA by kernels_*.cpp), called through the one dispatch (isa_dispatch.cpp:
// cpu_isa_kernels(), cpuid capped by MULTIVERSE_CPU_ISA, as for the forward).
#include <cstdint>
#include <memory>
#include <vector>

#include "isa_kernels.h"
#include "multiverse/cpu_kernels.h"
#include "multiverse/index_math.h"
#include "parallel.h"

namespace multiverse::cpu {
namespace {

// Striped spin locks (SpinLocks over words owned here).
struct LockWords {
  static constexpr uint64_t kStripes = 4093;
  std::unique_ptr<int32_t[]> words{new int32_t[kStripes]()};
  SpinLocks locks() const { return SpinLocks{words.get(), kStripes}; }
};

struct Scratch {
  std::vector<float> f;
  std::vector<int32_t> i;
  // BwdScratch for a task of `rows` packed rows (isa_kernels.h sizes and order).
  BwdScratch view(int32_t head_dim, int32_t rows) {
    const int64_t nf = bwd_scratch_floats(head_dim, rows);
    const int64_t ni = bwd_scratch_ints(rows);
    if (static_cast<int64_t>(f.size()) < nf + kAlignFloats) f.resize(nf + kAlignFloats);
    if (static_cast<int64_t>(i.size()) < ni) i.resize(ni);
    const int64_t dp = bwd_dim_pad(head_dim);
    const int64_t kv = bwd_align(kBwdSubChunk * dp), rd = bwd_align(kBwdRowBlock * dp);
    const int64_t rt = bwd_align(kBwdRowBlock * kBwdSubChunk);
    BwdScratch s;
    s.k = align64(f.data());
    s.kt = s.k + kv;
    s.vt = s.kt + kv;
    s.dk = s.vt + kv;
    s.dv = s.dk + kv;
    s.q = s.dv + kv;
    s.dout = s.q + rd;
    s.dq = s.dout + rd;
    s.s = s.dq + rd;
    s.ds = s.s + rt;
    s.vrow = s.ds + rt;
    s.lse = s.vrow + bwd_align(dp);
    s.delta = s.lse + bwd_align(rows);
    s.row = i.data();
    s.head = s.row + rows;
    s.vis = s.head + rows;
    s.sub = s.vis + rows;
    s.svis = s.sub + rows;
    s.lo = s.svis + rows;
    s.slo = s.lo + rows;
    return s;
  }
};

}  // namespace

void tree_attention_backward(const TreeAttentionBackwardParams& p) {
  const IsaKernels& k = cpu_isa_kernels();
  parallel_for(p.total_q, 64, [&](int64_t b, int64_t e) { k.bwd_delta(p, b, e); });
  const LockWords row_words, slot_words;
  const SpinLocks row_locks = row_words.locks(), slot_locks = slot_words.locks();
  const int32_t group = gqa_group(p.num_qo_heads, p.num_kv_heads);
  const int64_t tasks = static_cast<int64_t>(p.num_items) * p.num_kv_heads;
  parallel_tasks<Scratch>(tasks, [&](int64_t t, Scratch& sc) {
    const int32_t item = static_cast<int32_t>(t / p.num_kv_heads);
    const BwdScratch s = sc.view(p.head_dim, p.item_num_readers[item] * group);
    k.bwd_task(p, item, static_cast<int32_t>(t % p.num_kv_heads), s, row_locks, slot_locks);
  });
}

}  // namespace multiverse::cpu
