// Standalone check of the CPU kernels' task queue (csrc/cpu/parallel.h, built here with OpenMP): on a
// step with few tasks every worker must get one. Task 0 waits (at most 5 s) until another task has
// started; a worker that claimed task 0 and, as its look-ahead, the only other task would wait alone.
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
  std::printf(fails ? "FAIL\n" : "OK\n");
  return fails ? 1 : 0;
}
