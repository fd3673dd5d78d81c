// KERNEL UNIT (baseline): the forward and backward CPU kernels compiled for the build's default target
// (SSE2 on x86-64; any CPU elsewhere): 4-float vectors. Exports kKernelsBaseline (isa_kernels.h), the
// fallback of the dispatch in isa_dispatch.cpp.
#include "kernels_prelude.h"

#define MV_LEVEL 0
#define MV_ISA CpuIsa::kBaseline
#define MV_KERNELS kKernelsBaseline
#include "kernels_isa_unit.h"
