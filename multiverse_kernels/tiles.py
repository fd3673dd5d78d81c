"""The Triton kernels' tile tables: one definition, read by the kernels' dispatchers
(backends/triton/tree_attention.py, tree_attention_backward.py), the planner (:data:`MAX_TILE_ROWS`: a
work item packs at most the largest row tile's rows, so a chunk is loaded once for all of them), the
compile report (scripts/triton_compile_report.py) and the GPU tests. Plain data: importing it needs no
Triton."""

from __future__ import annotations

__all__ = ["HEAD_DIMS", "TILES", "VARIANT_TILES", "MAX_BLOCK_M", "MAX_TILE_ROWS", "DKDV_TILES", "DQ_TILES",
           "DQ_VARIANT_TILES"]

HEAD_DIMS = (64, 128, 256)
# (HEAD_DIM, BLOCK_M) -> (BLOCK_N, num_warps): every tile the dispatcher may pick. Chosen with the
# compile report (scripts/triton_compile_report.py) so that on sm_90a and sm_100a
#  * no variant spills: the fp32 accumulator BLOCK_M x HEAD_DIM, the current and the prefetched
#    BLOCK_N x HEAD_DIM K and V tiles (software pipeline, see the kernel) must fit in registers;
#  * no warp duplicates another's tensor-core work: a warp owns 16 rows (a Hopper warp group of 4 warps
#    64 rows) and 8 columns (mma.sync) of a dot, so 64-row tiles take 4 warps, and 8 warps need >= 64
#    columns in the 16-row tiles and >= 32 in the 32-row tiles. The report fails otherwise.
# The third entry: the KV loop prefetches (software pipeline). Not for head_dim 256: a dup-free tile has
# BLOCK_N >= 8 x num_warps columns, so the double-buffered K/V tiles alone take >= head_dim / 2 = 128
# registers per thread, and they spill. 256-wide heads stop at 32 rows (64 rows spill on sm_90a).
# The 256-row tile of head_dim 64 (main: one program loads a chunk once for up to 256 packed rows)
# does not prefetch: not yet checked with the prefetching loop. Since the NaN policy's flags
# (docs/errors.md) some tiles gave up the prefetch or took narrower KV blocks to stay spill-free, and
# head_dim 256 stops at 16 rows (its 32-row tile spills ~600 B); the 16-row tile spills <= 32 B on
# sm_100a (allowed, and listed, in the report's KNOWN_SPILLS).
TILES = {
    (64, 16): (32, 4, True), (64, 32): (64, 4, True), (64, 64): (32, 4, True), (64, 128): (32, 8, True),
    (128, 16): (64, 8, True), (128, 32): (64, 8, False), (128, 64): (16, 4, False), (128, 128): (16, 8, True),
    (256, 16): (64, 8, False),
    (64, 256): (32, 8, False),
}

# (HEAD_DIM, BLOCK_M, variant) -> (BLOCK_N, num_warps, prefetch): a forward tile for an attention variant
# ("softcap", "window", "fp8") where the plain tile spills with it (compile report): the 256-row tile
# of head_dim 64 spills 20-28 B on sm_100a with the soft-cap or the window, 16-token KV blocks do not.
# (Head_dim 256's 16-row tile spills 8-48 B with a variant on sm_100a, like the plain one's 32 B; a
# 32 x 4-warp tile spills more: those are listed in the report's KNOWN_SPILLS.) A call with several
# variants takes the last listed one's tile.
VARIANT_TILES: dict[tuple[int, int, str], tuple[int, int, bool]] = {
    (64, 256, "softcap"): (16, 8, False), (64, 256, "window"): (16, 8, False),
}

MAX_BLOCK_M = {d: max(bm for dd, bm in TILES if dd == d) for d in HEAD_DIMS}
"""Largest packed row tile of the forward per head_dim."""

MAX_TILE_ROWS = dict(MAX_BLOCK_M)
"""Packed (reader x GQA head) rows per work item by head_dim: the forward's largest row tile."""

# ---- backward
# head_dim -> (BLOCK_N, BLOCK_M, num_warps, num_stages) of each kernel; chosen with the compile report
# (scripts/triton_compile_report.py) so that no variant spills on sm_90a or sm_100a (the dQ kernel
# spills a few bytes on sm_100a with one stage; two stages do not).
DKDV_TILES = {64: (64, 32, 4, 1), 128: (64, 32, 8, 1), 256: (32, 16, 8, 1)}
DQ_TILES = {64: (32, 64, 4, 2), 128: (32, 64, 4, 2), 256: (64, 16, 8, 2)}
# (head_dim, variant) -> the dQ kernel's tile where the plain one spills with the variant (compile report:
# 76 B for the soft-cap at head_dim 128 on sm_100a; the window's 16 B at 256 stays with the plain tile,
# no other tile did better: KNOWN_SPILLS).
DQ_VARIANT_TILES = {(128, "softcap"): (16, 64, 4, 2)}
