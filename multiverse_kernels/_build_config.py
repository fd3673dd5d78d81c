"""What the compiled parts are built from: one list of sources and flags for ``setup.py`` (ahead of
time) and :mod:`multiverse_kernels._jit` (on first use when no prebuilt library is installed).

Standard library only: ``setup.py`` loads this file by path, before the package (and maybe torch)
can be imported. Source paths are relative to the directory that holds ``csrc/``: the repository root
in a source tree or an editable install, ``multiverse_kernels/_csrc/..`` in an installed wheel (see
docs/build.md).
"""

from __future__ import annotations

# multiverse_kernels._C: CPU kernels + the torch.ops.multiverse_C schemas.
# csrc/cpu: isa_dispatch.cpp (cpuid + MULTIVERSE_CPU_ISA -> one table of kernels for forward and backward),
# the plan-driven drivers tree_attention{,_backward}.cpp, and one kernel unit per ISA (kernels_*.cpp).
CPU_SOURCES = ("csrc/torch_bindings.cpp", "csrc/plan.cpp", "csrc/absorb.cpp", "csrc/block_tables.cpp",
               "csrc/cpu/isa_dispatch.cpp",
               "csrc/cpu/tree_attention.cpp", "csrc/cpu/tree_attention_backward.cpp",
               "csrc/cpu/kernels_amx.cpp", "csrc/cpu/kernels_amx_emulated.cpp",
               "csrc/cpu/kernels_avx512bf16.cpp", "csrc/cpu/kernels_avx512.cpp", "csrc/cpu/kernels_avx2.cpp",
               "csrc/cpu/kernels_baseline.cpp",
               "csrc/cpu/merge_states.cpp", "csrc/cpu/append_paged_kv.cpp")
CPU_CXX_FLAGS = ("-O3", "-std=c++20", "-DMULTIVERSE_WITH_ATEN", "-fopenmp", "-Wno-psabi")
CPU_LINK_FLAGS = ("-fopenmp",)

# multiverse_kernels._C_cuda: CUDA kernels (their CUDA-key implementations of the same ops).
CUDA_SOURCES = ("csrc/torch_bindings_cuda.cpp", "csrc/plan.cpp", "csrc/cuda/tree_attention.cu",
                "csrc/cuda/merge_states.cu", "csrc/cuda/append_paged_kv.cu")
CUDA_CXX_FLAGS = ("-O3", "-std=c++20")
CUDA_NVCC_FLAGS = ("-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo")
# sm_90a / sm_100a SASS (H100/H200, B200), plus sm_80 SASS and compute_80 PTX that the driver
# JIT-compiles on any other GPU from sm_80 on, so the extension loads there too
DEFAULT_CUDA_ARCHS = "9.0a;10.0a;8.0+PTX"

# Include directories (relative, like the sources).
INCLUDE_DIRS = ("csrc/include", "csrc")

# What a wheel ships under multiverse_kernels/_csrc/ so the first import can build the kernels.
SOURCE_SUFFIXES = (".h", ".hpp", ".cuh", ".cpp", ".cu")
