// Prints the dynamic shared memory of each tensor-core tree-attention configuration (used by
// scripts/cuda_compile_report.py next to ptxas's registers/spills). Host only: needs no GPU.
#include <cstdio>

#include "multiverse/cuda_kernels.h"

int main() {
  using multiverse::DType;
  for (bool fp8 : {false, true})
    for (DType t : {DType::kFloat16, DType::kBFloat16})
      for (int d : {64, 128, 256})
        std::printf("tree_attention_mma %s%s D=%d dynamic_smem_bytes=%zu\n", t == DType::kFloat16 ? "fp16" : "bf16",
                    fp8 ? " fp8-kv" : "", d, multiverse::cuda::tree_attention_smem_bytes(t, d, fp8));
  return 0;
}
