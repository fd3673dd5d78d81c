// Headers every per-ISA tree-attention unit includes BEFORE its target pragma, so that library and
// header-inline code keeps the default target (see tree_attention_kernels.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "convert.h"
#include "multiverse/index_math.h"
#include "multiverse/params.h"
#include "tree_attention_kernels.h"

#if defined(MULTIVERSE_X86_ISAS)
#include <immintrin.h>
#endif
