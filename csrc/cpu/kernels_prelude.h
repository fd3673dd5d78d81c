// Headers every per-ISA kernel unit (kernels_*.cpp) includes BEFORE its target
// pragma, so that library and header-inline code keeps the default target (see isa_kernels.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "convert.h"
#include "isa_kernels.h"
#include "multiverse/index_math.h"
#include "multiverse/params.h"

#if defined(MULTIVERSE_X86_ISAS)
#include <immintrin.h>
#endif

// MV_TARGET_PUSH("feature,list") ... MV_TARGET_POP(): compile the functions between them for that
// target (GCC: push_options + target; Clang: an attribute pushed onto every function).
#define MV_PRAGMA_(...) _Pragma(#__VA_ARGS__)
#if defined(__clang__)
#define MV_TARGET_PUSH(t) MV_PRAGMA_(clang attribute push(__attribute__((target(t))), apply_to = function))
#define MV_TARGET_POP() MV_PRAGMA_(clang attribute pop)
#else
#define MV_TARGET_PUSH(t) MV_PRAGMA_(GCC push_options) MV_PRAGMA_(GCC target(t))
#define MV_TARGET_POP() MV_PRAGMA_(GCC pop_options)
#endif
