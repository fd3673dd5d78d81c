#!/usr/bin/env bash
# Build the torch-free C++ CPU library (csrc/plan.cpp, csrc/absorb.cpp, csrc/cpu/*.cpp) and the fuzz-corpus driver
# (csrc/tools/cpu_fuzz_driver.cpp) with AddressSanitizer + UndefinedBehaviorSanitizer and run the corpus:
# random valid forests and their host plans through tree_attention + merge_states, append_paged_kv and
# dense merge_states, each compared with a naive reference. Fails on any sanitizer report or mismatch.
#   bash scripts/sanitize_cpu.sh [num_cases=600]
# Also builds the existing smoke test with the sanitizers. Uses $CXX (default g++), OpenMP threads so
# the parallel paths run too. One build (every per-ISA kernel unit, csrc/cpu/kernels_*.cpp); the corpus
# runs once per kernel build this CPU can run, selected by MULTIVERSE_CPU_ISA as in the shipped library
# (the widest, then avx512 when the widest is avx512_bf16, avx2 when the CPU has it, then the portable
# baseline).
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${1:-600}
CXX=${CXX:-g++}
OUT=${SANITIZE_BUILD_DIR:-build/sanitize}
mkdir -p "$OUT"
SRCS="csrc/plan.cpp csrc/absorb.cpp $(ls csrc/cpu/*.cpp | tr '\n' ' ')"  # dispatcher, drivers, every per-ISA kernel unit
FLAGS="-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
       -fopenmp -Wall -Wno-psabi -Icsrc/include"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
t0=$(date +%s)
# shellcheck disable=SC2086
$CXX $FLAGS $SRCS csrc/tools/cpu_fuzz_driver.cpp -o "$OUT/cpu_fuzz_driver"
# shellcheck disable=SC2086
$CXX $FLAGS $SRCS csrc/tools/cpu_smoke_test.cpp -o "$OUT/cpu_smoke_test"
echo "sanitizer build: $(( $(date +%s) - t0 )) s"
ISAS="widest baseline"
if grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo && grep -qw f16c /proc/cpuinfo; then
  ISAS="widest avx2 baseline"
  # the widest is then avx512_bf16: the avx512 unit (the widest on AVX-512 CPUs without it) runs too
  if grep -qw avx512_bf16 /proc/cpuinfo && grep -qw avx512f /proc/cpuinfo; then ISAS="widest avx512 avx2 baseline"; fi
fi
for isa in $ISAS; do
  t0=$(date +%s)
  env=""
  [ "$isa" != widest ] && env=$isa
  MULTIVERSE_CPU_ISA=$env "$OUT/cpu_smoke_test"
  MULTIVERSE_CPU_ISA=$env "$OUT/cpu_fuzz_driver" "$CASES" 0
  echo "sanitizer run ($isa kernels, $CASES cases): $(( $(date +%s) - t0 )) s"
done
