// The body of one per-ISA kernel unit: kernels_*.cpp include kernels_prelude.h,
// open their target pragma, define MV_LEVEL (the ISA's level, see below) and MV_KERNELS (the name of
// the IsaKernels table to export, see isa_kernels.h), then include this. It compiles the shared SIMD
// helpers (simd.h), the forward kernels (tree_attention_fwd_impl.h) and the backward kernels
// (tree_attention_bwd_impl.h) for that target, all with internal linkage, and exports their entry
// points as one table, which isa_dispatch.cpp selects.
//
// MV_LEVEL: 0 baseline (the build's default target: SSE2 on x86-64), 1 AVX2 + FMA + F16C,
// 2 AVX-512 F/VL/BW/DQ, 3 + AVX512-BF16, 4 + AMX tiles (amx.h; MV_AMX_EMULATE 1: its software model).
// Code tests `MV_LEVEL >= n`, so a later level inherits everything of the levels below it and
// specialises only what it adds.
#ifndef MV_LEVEL
#error "define MV_LEVEL before including kernels_isa_unit.h"
#endif
#ifndef MV_KERNELS
#error "define MV_KERNELS (the exported IsaKernels table) before including kernels_isa_unit.h"
#endif
#ifndef MV_ISA
#error "define MV_ISA (the CpuIsa of the table) before including kernels_isa_unit.h"
#endif

#include "simd.h"
#if MV_LEVEL >= 4
#include "amx.h"
#endif
#include "tree_attention_fwd_impl.h"
#include "tree_attention_bwd_impl.h"

namespace multiverse::cpu {
extern const IsaKernels MV_KERNELS;
#if MV_LEVEL >= 1
const IsaKernels MV_KERNELS = {MV_ISA, &fwd::task, &fwd::task_heads, W, &fwd::fma_loop, &bwd::delta_rows,
                               &bwd::task};
#else
const IsaKernels MV_KERNELS = {MV_ISA, &fwd::task, nullptr, 0, &fwd::fma_loop, &bwd::delta_rows, &bwd::task};
#endif
}  // namespace multiverse::cpu
