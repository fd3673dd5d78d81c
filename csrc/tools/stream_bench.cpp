// Standalone read-rate microbenchmark of the CPU kernel's KV access pattern (issue 25 item 3): what
// share of a plain contiguous read can be had when reading one KV head's rows of a token-major paged
// cache ([tokens][heads][head_dim]: a head's consecutive token rows are heads * head_dim * elem bytes
// apart, 4 KiB for 8 heads x 128 fp32), row by row, with software prefetches `distance` rows ahead.
// No torch, no library: build and run by hand, e.g.
//   g++ -O3 -std=c++17 -mavx2 -fopenmp csrc/tools/stream_bench.cpp -o /tmp/stream_bench
//   OMP_NUM_THREADS=1 /tmp/stream_bench [tokens=8192] [heads=8] [row_bytes=512] [huge]
// "huge" backs the buffer with 2 MiB transparent huge pages (madvise(MADV_HUGEPAGE); THP "madvise" or
// "always" in /sys/kernel/mm/transparent_hugepage/enabled): what a KV cache allocated so would read (torch
// does it for large CPU tensors with THP_MEM_ALLOC_ENABLE=1).
// Prints GB/s per pattern (best of 5 passes) and the share of the contiguous read; then the same rows
// stored head-major, and token-major rows read a group of 2, 4, ... heads per task. Each thread reads
// its own heads (heads, or head groups, split over threads), as the kernel's tasks (one per chunk and KV
// head) do.
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <immintrin.h>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Sum of 64-byte lines (the reads a kernel would do: every byte loaded once).
inline __m256 sum_bytes(const char* p, size_t bytes, __m256 acc) {
  for (size_t o = 0; o < bytes; o += 64) {
    acc = _mm256_add_ps(acc, _mm256_loadu_ps(reinterpret_cast<const float*>(p + o)));
    acc = _mm256_add_ps(acc, _mm256_loadu_ps(reinterpret_cast<const float*>(p + o + 32)));
  }
  return acc;
}

float hsum(__m256 v) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  float s = 0;
  for (float x : f) s += x;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  const size_t tokens = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 8192;
  const size_t heads = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 8;
  const size_t row = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 512;
  const size_t bytes = tokens * heads * row;
  const bool huge = argc > 4 && std::strcmp(argv[4], "huge") == 0;
  const size_t align = huge ? size_t{1} << 21 : 4096, alloc = (bytes + align - 1) / align * align;
  char* buf = static_cast<char*>(std::aligned_alloc(align, alloc));
  if (huge && madvise(buf, alloc, MADV_HUGEPAGE) != 0) std::perror("madvise(MADV_HUGEPAGE)");
  for (size_t i = 0; i < bytes; i += 4) *reinterpret_cast<float*>(buf + i) = 1.0f;  // first touch
  const int nt = omp_get_max_threads();
  std::printf("stream_bench: %zu tokens x %zu heads x %zu-byte rows = %.1f MB, %d thread(s), %s pages\n", tokens,
              heads, row, bytes / 1e6, nt, huge ? "2 MiB (THP)" : "4 KiB");
  float sink = 0;
  auto best = [&](auto&& pass) {
    double b = 1e30;
    for (int r = 0; r < 5; ++r) {
      const double t0 = now();
      sink += pass();
      b = std::min(b, now() - t0);
    }
    return bytes / b / 1e9;
  };
  // 1. contiguous: the whole buffer split into one range per thread
  const double contiguous = best([&] {
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      const size_t per = bytes / omp_get_num_threads() / 64 * 64;
      const size_t a = per * omp_get_thread_num();
      total += hsum(sum_bytes(buf + a, per, _mm256_setzero_ps()));
    }
    return total;
  });
  std::printf("%-44s %7.1f GB/s  100%%\n", "contiguous", contiguous);
  // One head's rows at a time (heads split over threads), prefetching `dist` rows ahead (all their
  // lines); row_at(h, t) is the byte offset of head h's token t in the layout being read.
  auto rows = [&](const char* layout, int dist, auto row_at) {
    const double gbs = best([&] {
      float total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
      for (size_t h = 0; h < heads; ++h) {
        __m256 acc = _mm256_setzero_ps();
        for (size_t t = 0; t < tokens; ++t) {
          if (dist > 0 && t + dist < tokens) {
            const char* pf = buf + row_at(h, t + dist);
            for (size_t o = 0; o < row; o += 64) _mm_prefetch(pf + o, _MM_HINT_T1);
          }
          acc = sum_bytes(buf + row_at(h, t), row, acc);
        }
        total += hsum(acc);
      }
      return total;
    });
    char name[64];
    std::snprintf(name, sizeof(name), "%s rows, prefetch %d rows ahead", layout, dist);
    std::printf("%-44s %7.1f GB/s  %3.0f%%\n", name, gbs, 100 * gbs / contiguous);
  };
  // 2. token-major ([tokens][heads][row]: a head's rows heads * row bytes apart, the paged cache's layout)
  for (const int dist : {0, 1, 2, 4, 8, 16, 32})
    rows("strided", dist, [&](size_t h, size_t t) { return (t * heads + h) * row; });
  // 3. the same rows stored head-major ([heads][tokens][row]: a head's rows contiguous, vLLM's CPU layout
  // within a block)
  for (const int dist : {0, 8}) rows("head-major", dist, [&](size_t h, size_t t) { return (h * tokens + t) * row; });
  // 4. token-major, a group of g heads per task (groups split over threads): per token the group's rows,
  // g * row contiguous bytes of the token's heads * row (what a task over several KV heads reads)
  for (size_t g = 2; g <= heads; g *= 2) {
    const size_t groups = (heads + g - 1) / g;
    const double gbs = best([&] {
      float total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
      for (size_t gi = 0; gi < groups; ++gi) {
        const size_t h0 = gi * g, nh = std::min(g, heads - h0);
        __m256 acc = _mm256_setzero_ps();
        for (size_t t = 0; t < tokens; ++t) acc = sum_bytes(buf + (t * heads + h0) * row, nh * row, acc);
        total += hsum(acc);
      }
      return total;
    });
    char name[64];
    std::snprintf(name, sizeof(name), "strided, %zu heads per task", g);
    std::printf("%-44s %7.1f GB/s  %3.0f%%\n", name, gbs, 100 * gbs / contiguous);
  }
  std::printf("(checksum %g)\n", static_cast<double>(sink));
  std::free(buf);
  return 0;
}
