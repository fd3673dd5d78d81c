// Standalone check of the CPU kernels' task queue (csrc/cpu/parallel.h, built here with OpenMP): on a
// step with few tasks every worker must get one. Task 0 waits (at most 5 s) until another task has
// started; a worker that claimed task 0 and, as its look-ahead, the only other task would wait alone.
// With costs: a step of two long tasks and two short ones (a one-request decode step with 2 KV heads:
// the prompt's chunk per head, then the request's one-token node per head) must run both long tasks at
// once: task 0 waits until task 1 has started (a count rule let the first worker claim task 1 as its
// look-ahead, leaving the other worker the short ones).
// Run by tests/backends/test_cpu_task_queue.py with OMP_NUM_THREADS=2; exit status 0 on success.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "parallel.h"

namespace {
struct NoScratch {};
}  // namespace

int main() {
  using multiverse::cpu::parallel_tasks_lookahead;
  int fails = 0;
  for (const int64_t n : {2, 3, 5, 64}) {
    for (int rep = 0; rep < 20; ++rep) {
      std::atomic<int> started{0}, runs{0};
      std::atomic<bool> ok{true};
      parallel_tasks_lookahead<NoScratch>(n, [&](int64_t task, int64_t next, NoScratch&) {
        started.fetch_add(1);
        if (task == 0) {
          const auto t0 = std::chrono::steady_clock::now();
          while (started.load() < 2) {
            if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(5)) {
              ok = false;
              break;
            }
            std::this_thread::yield();
          }
        }
        if (task < 0 || task >= n || next >= n) ok = false;
        runs.fetch_add(1);
      });
      if (!ok.load() || runs.load() != n) {
        std::printf("n=%lld, repeat %d: one worker held every task (or a task ran twice / out of range)\n",
                    static_cast<long long>(n), rep);
        ++fails;
      }
    }
  }
  for (int rep = 0; rep < 20; ++rep) {
    const int64_t n = 4;
    const int64_t cost[4] = {1000, 1000, 1, 1};
    std::atomic<bool> started1{false}, ok{true};
    std::atomic<int> runs{0};
    parallel_tasks_lookahead<NoScratch>(
        n,
        [&](int64_t task, int64_t, NoScratch&) {
          if (task == 1) started1 = true;
          if (task == 0) {
            const auto t0 = std::chrono::steady_clock::now();
            while (!started1.load()) {
              if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(5)) {
                ok = false;
                break;
              }
              std::this_thread::yield();
            }
          }
          runs.fetch_add(1);
        },
        [&](int64_t i) {
          int64_t s = 0;
          for (int64_t j = i; j < n; ++j) s += cost[j];
          return s;
        });
    if (!ok.load() || runs.load() != n) {
      std::printf("costs 1000, 1000, 1, 1, repeat %d: both long tasks went to one worker\n", rep);
      ++fails;
    }
  }
  std::printf(fails ? "FAIL\n" : "OK\n");
  return fails ? 1 : 0;
}
