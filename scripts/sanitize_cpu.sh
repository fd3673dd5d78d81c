#!/usr/bin/env bash
# Build the torch-free C++ CPU library (csrc/plan.cpp, csrc/absorb.cpp, csrc/cpu/*.cpp) and the fuzz-corpus driver
# (csrc/tools/cpu_fuzz_driver.cpp) with AddressSanitizer + UndefinedBehaviorSanitizer and run the corpus:
# random valid forests and their host plans through tree_attention + merge_states, tree_attention_backward
# (fp32 / fp16 / bf16 cases), append_paged_kv and
# dense merge_states, each compared with a naive reference. Fails on any sanitizer report or mismatch.
#   bash scripts/sanitize_cpu.sh [num_cases=600]
# Also builds the existing smoke test with the sanitizers. Uses $CXX (default g++), OpenMP threads so
# the parallel paths run too. One build (every per-ISA kernel unit, csrc/cpu/kernels_*.cpp); the corpus
# runs once per kernel build this CPU can run, selected by MULTIVERSE_CPU_ISA as in the shipped library
# (the widest, then avx512_bf16 when the widest is amx, amx_emulated and avx512 when the CPU has
# avx512_bf16, avx2 when it has it, then the portable baseline).
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
# every source compiled once (as many compilers at a time as the machine has cores), then both programs linked
JOBS=$(nproc 2>/dev/null || echo 2)
mkdir -p "$OUT/obj"
# shellcheck disable=SC2086
printf '%s\n' $SRCS csrc/tools/cpu_fuzz_driver.cpp csrc/tools/cpu_smoke_test.cpp |
  xargs -P "$JOBS" -I{} sh -c 'o="$1/obj/$(echo "$2" | tr / _).o"; $3 $4 -c "$2" -o "$o"' _ "$OUT" {} "$CXX" "$(echo $FLAGS)"
OBJS=""
for src in $SRCS; do OBJS="$OBJS $OUT/obj/$(echo "$src" | tr / _).o"; done
# shellcheck disable=SC2086
$CXX $FLAGS $OBJS "$OUT/obj/csrc_tools_cpu_fuzz_driver.cpp.o" -o "$OUT/cpu_fuzz_driver"
# shellcheck disable=SC2086
$CXX $FLAGS $OBJS "$OUT/obj/csrc_tools_cpu_smoke_test.cpp.o" -o "$OUT/cpu_smoke_test"
echo "sanitizer build: $(( $(date +%s) - t0 )) s"
ISAS="widest"
has() { grep -qw "$1" /proc/cpuinfo 2>/dev/null; }
# the widest is then amx: the avx512_bf16 unit runs too
if has amx_tile && has amx_bf16 && has avx512_bf16; then ISAS="$ISAS avx512_bf16"; fi
# the AMX unit on its software model of the tiles (wherever avx512_bf16 runs), and the avx512 unit
# (the widest on AVX-512 CPUs without AVX512_BF16)
if has avx512_bf16 && has avx512f; then ISAS="$ISAS amx_emulated avx512"; fi
if has avx2 && has fma && has f16c; then ISAS="$ISAS avx2"; fi
ISAS="$ISAS baseline"
for isa in $ISAS; do
  t0=$(date +%s)
  env=""
  [ "$isa" != widest ] && env=$isa
  MULTIVERSE_CPU_ISA=$env "$OUT/cpu_smoke_test"
  MULTIVERSE_CPU_ISA=$env "$OUT/cpu_fuzz_driver" "$CASES" 0
  echo "sanitizer run ($isa kernels, $CASES cases): $(( $(date +%s) - t0 )) s"
done
