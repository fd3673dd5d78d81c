#!/usr/bin/env bash
# Build the torch-free C++ CPU library (csrc/plan.cpp, csrc/absorb.cpp, csrc/cpu/*.cpp) and the fuzz-corpus driver
# (csrc/tools/cpu_fuzz_driver.cpp) with AddressSanitizer + UndefinedBehaviorSanitizer and run the corpus:
# random valid forests and their host plans through tree_attention + merge_states, append_paged_kv and
# dense merge_states, each compared with a naive reference. Fails on any sanitizer report or mismatch.
#   bash scripts/sanitize_cpu.sh [num_cases=600]
# Also builds the existing smoke test with the sanitizers. Uses $CXX (default g++), OpenMP threads so
# the parallel paths run too. Two builds: the function-multiversioned kernels (target_clones, the
# shipped code) and the portable baseline (-DMULTIVERSE_NO_CLONES).
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${1:-600}
CXX=${CXX:-g++}
OUT=${SANITIZE_BUILD_DIR:-build/sanitize}
mkdir -p "$OUT"
SRCS="csrc/plan.cpp csrc/absorb.cpp $(ls csrc/cpu/*.cpp | tr '\n' ' ')"  # every CPU kernel (all ISA files + backward)
FLAGS="-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
       -fopenmp -Wall -Wno-psabi -Icsrc/include"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for variant in clones noclones; do
  extra=""
  [ "$variant" = noclones ] && extra="-DMULTIVERSE_NO_CLONES"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  $CXX $FLAGS $extra $SRCS csrc/tools/cpu_fuzz_driver.cpp -o "$OUT/cpu_fuzz_driver_$variant"
  # shellcheck disable=SC2086
  $CXX $FLAGS $extra $SRCS csrc/tools/cpu_smoke_test.cpp -o "$OUT/cpu_smoke_test_$variant"
  echo "sanitizer build ($variant): $(( $(date +%s) - t0 )) s"
  t0=$(date +%s)
  "$OUT/cpu_smoke_test_$variant"
  # The widest ISA this CPU runs, then the portable baseline micro-kernels (MULTIVERSE_CPU_ISA caps it).
  for isa in "" baseline; do
    MULTIVERSE_CPU_ISA=$isa "$OUT/cpu_fuzz_driver_$variant" "$CASES" 0
  done
  echo "sanitizer run ($variant, $CASES cases x {widest ISA, baseline}): $(( $(date +%s) - t0 )) s"
done
