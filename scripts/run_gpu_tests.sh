#!/usr/bin/env bash
# Every step of the GPU run in order, appending to one results file (docs/gpu.md):
#
#   scripts/run_gpu_tests.sh [results-file]      (default: gpu_results.txt)
#
# = python -m multiverse_kernels.gpu_run --results FILE. Each step is limited to 470 s; on a lent machine
# with a 10-minute limit per command run the steps one per command instead:
#   python -m multiverse_kernels.gpu_run --step <name> --results FILE   (--list shows the steps)
# Without a GPU every step reports "skipped: no GPU (<reason>)". Uses the active Python (its torch).
set -uo pipefail
cd "$(dirname "$0")/.."
exec python -m multiverse_kernels.gpu_run --results "${1:-gpu_results.txt}"
