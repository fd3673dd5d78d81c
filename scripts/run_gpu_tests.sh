#!/usr/bin/env bash
# Run EVERY GPU test and GPU benchmark on a machine with an NVIDIA GPU; write the results to a file.
#
#   scripts/run_gpu_tests.sh [results-file]      (default: gpu_results_<host>_<UTC time>.txt)
#
# Steps: build the extension for this GPU (CUDA part forced on), the ptxas compile report, the GPU
# tests (CUDA + Triton kernels, not the interpreter) with every skip reason printed, then the main
# benchmark on the GPU (all backends next to dense SDPA, FlexAttention and per-branch decode, in fp16
# and bf16). Exit status: non-zero if the build, the report or any test failed, or if the GPU tests
# were skipped. Uses the active Python environment (torch CUDA build required).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_results_$(hostname)_$(date -u +%Y%m%dT%H%M%SZ).txt}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
status=0
exec > >(tee "$OUT") 2>&1
echo "== multiverse_kernels GPU run $(date -u) on $(hostname)"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv || status=1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')
case "$cap" in 9.0|10.0) arch="${cap}a" ;; *) arch="$cap" ;; esac
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0a;10.0a;$arch"}
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
MULTIVERSE_BUILD_CUDA=1 MULTIVERSE_BUILD_STRICT=1 MAX_JOBS=${MAX_JOBS:-8} \
  python setup.py -q build_ext --inplace || status=1
echo "== ptxas compile report (sm_90a, sm_100a)"
python scripts/cuda_compile_report.py -j "${MAX_JOBS:-8}" || status=1
echo "== GPU tests (every test marked gpu, in all test files)"
MULTIVERSE_REQUIRE_CPP=1 python -m pytest -q -rs -p no:cacheprovider -m gpu tests \
  | tee /tmp/mv_gpu_pytest.txt || status=1
if grep -q "SKIPPED" /tmp/mv_gpu_pytest.txt; then
  echo "some GPU tests were SKIPPED on a GPU machine (reasons above): failing"; status=1
fi
echo "== benchmark (fp16)"
python -m multiverse_kernels.bench --device cuda --dtype float16 --iters 50 || status=1
echo "== benchmark (bf16)"
python -m multiverse_kernels.bench --device cuda --dtype bfloat16 --iters 50 || status=1
echo "== done: status $status"
echo "results written to $OUT"
exit $status
