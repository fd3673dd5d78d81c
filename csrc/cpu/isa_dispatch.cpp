// DISPATCHER: the one runtime ISA dispatch of the CPU kernels, forward and backward. Reads cpuid (and
// the OS's saved register state) once, applies the MULTIVERSE_CPU_ISA cap (read per call), and hands
// the drivers (tree_attention.cpp, tree_attention_backward.cpp) the IsaKernels table of the selected
// ISA (isa_kernels.h; one per kernel unit, kernels_*.cpp).
//
// Adding an ISA (amx and avx512_bf16 were added so): a CpuIsa value (multiverse/cpu_kernels.h), its name
// in kIsaNames, its cpuid test in detect_isa, a kernel unit exporting its table, and its row in kTables.
// amx_emulated (the AMX unit on a software model of the tiles) is the one ISA detect_isa never reports:
// MULTIVERSE_CPU_ISA=amx_emulated selects it wherever avx512_bf16 runs.
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "isa_kernels.h"
#include "multiverse/cpu_kernels.h"
#include "parallel.h"

#if defined(MULTIVERSE_X86_ISAS)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace multiverse::cpu {
namespace {

// Indexed by CpuIsa.
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512", "avx512_bf16", "amx", "amx_emulated"};
constexpr int kNumIsas = sizeof(kIsaNames) / sizeof(kIsaNames[0]);

// The kernel table of each CpuIsa (nullptr: not built for this target).
const IsaKernels* const kTables[kNumIsas] = {
    &kKernelsBaseline,
#if defined(MULTIVERSE_X86_ISAS)
    &kKernelsAvx2,
    &kKernelsAvx512,
    &kKernelsAvx512Bf16,
#if defined(MULTIVERSE_AMX_ISA)
    &kKernelsAmx,
#else
    nullptr,  // (a compiler without AMX: the avx512_bf16 path is the widest)
#endif
    &kKernelsAmxEmulated,
#else
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
#endif
};

#if defined(MULTIVERSE_X86_ISAS)
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
#endif

#if defined(MULTIVERSE_X86_ISAS)
bool request_tile_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023;  // asm/prctl.h
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
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
  if (!(f512 && dq && bw && vl && (xcr0 & 0xe0) == 0xe0)) return CpuIsa::kAvx2;  // OS saves zmm/k state
  // AVX512_BF16: cpuid leaf 7 subleaf 1, eax bit 5 (leaf 7's eax gives the highest subleaf)
  unsigned a1 = 0, b1, c1, d1;
  if (!(a >= 1 && __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5)))) return CpuIsa::kAvx512;
  // AMX: leaf 7 subleaf 0 edx bit 24 (AMX-TILE) and bit 22 (AMX-BF16), the OS saving the tile state
  // (XCR0 bits 17 XTILECFG, 18 XTILEDATA), and Linux's per-process permission to use the tile data
  // (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, as torch and vLLM request it; granted for
  // every thread of the process). Anything missing: the avx512_bf16 path.
  const bool amx = (d & (1u << 24)) && (d & (1u << 22)) && (xcr0 & (3ull << 17)) == (3ull << 17);
  if (amx && kTables[static_cast<int>(CpuIsa::kAmx)] != nullptr && request_tile_permission()) return CpuIsa::kAmx;
  return CpuIsa::kAvx512Bf16;
#else
  return CpuIsa::kBaseline;
#endif
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  const int i = static_cast<int>(isa);
  return i >= 0 && i < kNumIsas ? kIsaNames[i] : "baseline";
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
  int want = -1;
  std::string names;
  for (int i = kNumIsas - 1; i >= 0; --i) {
    if (v == kIsaNames[i]) want = i;
    names += std::string(names.empty() ? "" : i == 0 ? " or " : ", ") + kIsaNames[i];
  }
  if (want < 0) throw std::invalid_argument("MULTIVERSE_CPU_ISA=" + v + ": expected " + names);
  if (want == static_cast<int>(CpuIsa::kAmxEmulated)) {  // the software model needs avx512_bf16 only
    if (static_cast<int>(best) < static_cast<int>(CpuIsa::kAvx512Bf16))
      throw std::invalid_argument("MULTIVERSE_CPU_ISA=" + v + ": needs avx512_bf16; this CPU (or build) runs at most " +
                                  cpu_isa_name(best));
    return CpuIsa::kAmxEmulated;
  }
  if (want > static_cast<int>(best))
    throw std::invalid_argument("MULTIVERSE_CPU_ISA=" + v + ": this CPU (or build) runs at most " +
                                cpu_isa_name(best));
  return static_cast<CpuIsa>(want);
}

const IsaKernels& cpu_isa_kernels() {
  // Every ISA up to cpu_isa_supported() has a table: detect_isa reports only ISAs this target builds.
  return *kTables[static_cast<int>(cpu_isa_selected())];
}

double cpu_fma_peak(int64_t iters, int64_t threads) {
  const FmaLoopFn fn = cpu_isa_kernels().fma_loop;
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

}  // namespace multiverse::cpu
