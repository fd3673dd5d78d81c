// parallel_for used by the CPU kernels: ATen's thread pool inside the torch extension
// (MULTIVERSE_WITH_ATEN), OpenMP in the standalone CMake library, serial otherwise.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(MULTIVERSE_WITH_ATEN)
#include <ATen/Parallel.h>
#elif defined(_OPENMP)
#include <omp.h>
#endif

namespace multiverse::cpu {

// Calls f(begin, end) on disjoint ranges covering [0, n); ranges hold at least `grain` indices.
template <class F>
void parallel_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
#if defined(MULTIVERSE_WITH_ATEN)
  at::parallel_for(0, n, grain, f);
#elif defined(_OPENMP)
  const int64_t chunks = (n + grain - 1) / grain;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * grain;
    f(b, b + grain < n ? b + grain : n);
  }
#else
  (void)grain;
  f(0, n);
#endif
}

// How many workers run_workers(n, ...) starts: min(threads, n) (1 without a thread pool).
inline int64_t worker_count(int64_t n) {
#if defined(MULTIVERSE_WITH_ATEN)
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
#elif defined(_OPENMP)
  (void)n;
  return std::max(1, omp_get_max_threads());
#else
  (void)n;
  return 1;
#endif
}

// Runs worker() once on each of worker_count(n) threads (ATen's pool, OpenMP, or inline).
template <class W>
void run_workers(int64_t n, const W& worker) {
#if defined(MULTIVERSE_WITH_ATEN)
  const int64_t nt = worker_count(n);
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) worker();
  });
#elif defined(_OPENMP)
  (void)n;
#pragma omp parallel
  worker();
#else
  (void)n;
  worker();
#endif
}

// Dynamic schedule: every worker thread pulls task indices 0..n-1 from a shared counter and calls
// body(task, next_task, state), where next_task (-1 when none) is the task the same worker runs next, so
// the body can prefetch its data; `State` is the worker's own scratch. Work items differ a lot in cost
// (a shared prefix chunk has many readers, a leaf chunk one), so a static split would leave threads idle.
//
// A worker claims its next task before running the current one only while the other workers keep at
// least that task's cost each: the tasks left unclaimed after it plus the tasks the others have claimed
// and not finished (suffix_cost(i): the summed cost of tasks i .. n-1, non-increasing, suffix_cost(n) =
// 0; a shared counter adds up the cost of finished tasks). So a worker that the pool starts late
// (threads wake up one by one) still finds work, and a step whose cost sits in a few tasks is shared
// out: a one-request decode step - one long chunk per KV head, then the request's one-token node per KV
// head - ran both long tasks on one thread while the other took the one-token ones when the rule only
// counted unclaimed tasks (at least one per other worker); a long queue's tail (others still busy with
// their long tasks) keeps its look-aheads. Without a cost (below), every task counts 1. Near the end of
// the queue a worker runs its task without a look-ahead and claims the next one after.
template <class State, class F, class C>
void parallel_tasks_lookahead(int64_t n, const F& body, const C& suffix_cost) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0}, done{0};
  const int64_t workers = worker_count(n);
  const int64_t total = suffix_cost(0);
  run_workers(n, [&]() {
    thread_local State st;  // scratch survives across calls: no page faults per step
    int64_t cur = next.fetch_add(1, std::memory_order_relaxed);
    while (cur < n) {
      const int64_t own = suffix_cost(cur) - suffix_cost(cur + 1);
      // claiming `ahead` leaves tasks ahead + 1 .. n - 1 (at least one per other worker) and the
      // others' unfinished claimed tasks (claimed before `ahead`, not done, not this worker's current)
      int64_t ahead = next.load(std::memory_order_relaxed), nxt = -1;
      while (ahead + workers <= n) {
        const int64_t at = suffix_cost(ahead), after = suffix_cost(ahead + 1);
        const int64_t busy = total - at - done.load(std::memory_order_relaxed) - own;
        if (after + busy < (workers - 1) * (at - after)) break;
        if (next.compare_exchange_weak(ahead, ahead + 1, std::memory_order_relaxed)) {
          nxt = ahead;
          break;
        }
      }
      body(cur, nxt, st);
      done.fetch_add(own, std::memory_order_relaxed);
      cur = nxt >= 0 ? nxt : next.fetch_add(1, std::memory_order_relaxed);
    }
  });
}

// Every task of cost 1.
template <class State, class F>
void parallel_tasks_lookahead(int64_t n, const F& body) {
  parallel_tasks_lookahead<State>(n, body, [n](int64_t i) { return n - i; });
}

// The same schedule without the look-ahead: body(task, state); a worker claims a task only when it is
// free to run it (a claimed look-ahead that nothing prefetches could only unbalance the workers).
template <class State, class F>
void parallel_tasks(int64_t n, const F& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  run_workers(n, [&]() {
    thread_local State st;  // scratch survives across calls: no page faults per step
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n;
         t = next.fetch_add(1, std::memory_order_relaxed))
      body(t, st);
  });
}

}  // namespace multiverse::cpu
