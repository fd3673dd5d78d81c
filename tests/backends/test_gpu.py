"""What only the GPU paths have, for ``backend="triton"`` (compiled) and ``"cuda"`` on CUDA tensors: every
Triton row tile of the dispatcher's table against the reference (fp16, bf16, fp32; page sizes 1 and 16;
GQA), the device guard and current stream, a CUDA-graph capture of the public op replayed with another
step's plan copied in, the CUDA misaligned-stride fallback. Their comparisons with the reference on random
forests (tree attention, merge, append, backward) are the ``triton``/``cuda`` cases of tests/ops/test_<op>.py.

Needs a CUDA GPU, compiled Triton kernels (``TRITON_INTERPRET`` not 1) and, for ``cuda``, the built
extension; elsewhere every test is SKIPPED with the reason. ``python -m multiverse_kernels.gpu_run``
runs them on a GPU machine (docs/gpu.md).
"""

from __future__ import annotations

import pytest
import torch

import multiverse_kernels as mk
from multiverse_kernels.planning import PlanCapacity, plan_tree_attention
from multiverse_kernels.testing import (
    NO_GPU_REASON,
    assert_close_to_reference,
    backend_device,
    check_tree_attention,
    make_inputs,
    random_forest,
    sampling_forest,
    tolerance,
)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned")]

if not torch.cuda.is_available():
    pytest.skip(NO_GPU_REASON,
                allow_module_level=True)

DEV = "cuda"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _backend(name: str) -> str:
    """Skip (with the reason) when ``name`` cannot run compiled kernels on CUDA tensors here."""
    if backend_device(name) != DEV:  # triton with TRITON_INTERPRET=1
        pytest.skip("TRITON_INTERPRET=1: the Triton kernels are interpreted in this process; the GPU "
                    "tests need them compiled (run with TRITON_INTERPRET=0)")
    return name


def _reference(q, k, v, meta, sm_scale=None):
    return mk.tree_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), meta.to("cpu"),
                             sm_scale=sm_scale, return_lse=True, backend="reference")


def _triton_tiles():
    from multiverse_kernels.backends.triton.tree_attention import TILES

    return sorted(TILES)


# ---- tree attention: every Triton variant (head_dim x row tile x dtype), page sizes 1/16, GQA ----------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,block_m", [(64, 16), (64, 32), (64, 64), (64, 128), (128, 16), (128, 32),
                                       (128, 64), (128, 128), (256, 16)])
@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_every_tile(dtype, d, block_m, page_size):
    _backend("triton")
    from multiverse_kernels.backends.triton.tree_attention import TILES, attn_config

    assert (d, block_m) in TILES, "the parametrization lists every tile of the table"
    hq, hk = (8, 2) if block_m >= 32 else (4, 4)  # GQA 4 / no GQA
    group = hq // hk
    f, groups = random_forest(100 + block_m + d, page_size=page_size, max_len=80, max_nodes=12)
    meta = f.metadata(groups)
    rpt = max(1, block_m // group)
    plan = plan_tree_attention(meta.to(DEV), hq, hk, chunk_tokens=64, rows_per_tile=rpt, head_dim=d)
    cfg = attn_config(d, dtype, group, plan.max_item_readers, torch.device(DEV))
    assert cfg.BLOCK_M <= block_m
    check_tree_attention("triton", meta, f.num_pages, hq, hk, d, dtype, seed=d + block_m,
                         plan=dict(chunk_tokens=64, rows_per_tile=rpt))


def test_triton_tile_table_covered():
    assert sorted(_triton_tiles()) == sorted([(64, 16), (64, 32), (64, 64), (64, 128), (128, 16), (128, 32),
                                               (128, 64), (128, 128), (256, 16)])


# ---- device guard, current stream, CUDA graphs ---------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_other_device_than_current(backend):
    _backend(backend)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (tensors on cuda:1 while cuda:0 is current)")
    f, groups = sampling_forest(prompt=100, samples=4, gen_len=3)
    meta = f.metadata(groups).to("cuda:1")
    q, k, v = make_inputs(meta, f.num_pages, 8, 2, 128, torch.float16, device="cuda:1")
    with torch.cuda.device(0):
        out = mk.tree_attention(q, k, v, meta, backend=backend)
    torch.cuda.synchronize(1)
    assert out.device == torch.device("cuda:1")
    assert_close_to_reference("out", out, _reference(q, k, v, meta)[0], **tolerance(torch.float16))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_side_stream(backend):
    """Launches go to the caller's current stream: results written on a side stream are there after
    that stream is synchronized (and not before the inputs written on it)."""
    _backend(backend)
    f, groups = sampling_forest(prompt=300, samples=8, gen_len=3)
    meta = f.metadata(groups).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, 8, 2, 128, torch.float16, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q2 = q * 1.0  # written on s: a launch on another stream could read it before it is ready
        out = mk.tree_attention(q2, k, v, meta, backend=backend)
    s.synchronize()
    assert_close_to_reference("out", out, _reference(q, k, v, meta)[0], **tolerance(torch.float16))


def _decode_steps(hq, hk, d, dtype):
    """Two consecutive decode steps of one forest (same shapes of every metadata tensor)."""
    f, groups = sampling_forest(prompt=200, samples=8, gen_len=3, page_size=16)
    meta1 = f.metadata(groups)
    for node, _ in groups:
        f.append(node, 1)  # stays inside the nodes' last page: page tables keep their shapes
    meta2 = f.metadata(groups)
    for a, b in zip(meta1.tensors(), meta2.tensors()):
        assert a.shape == b.shape
    return f, meta1, meta2


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_public_op_replay_with_next_plan(backend):
    """Capture ``mk.tree_attention(..., plan=, validate=False)`` once; copy the next step's metadata,
    plan (``copy_into``, fixed PlanCapacity) and q into the captured buffers; replay = a fresh call."""
    _backend(backend)
    hq, hk, d, dtype = 8, 2, 128, torch.float16
    f, meta1, meta2 = _decode_steps(hq, hk, d, dtype)
    cap = PlanCapacity(512, 512, 512, 64)
    meta = meta1.to(DEV)
    plan = plan_tree_attention(meta, hq, hk, head_dim=d, capacity=cap)
    q, k, v = make_inputs(meta, f.num_pages, hq, hk, d, dtype, device=DEV, seed=1)

    def step():
        return mk.tree_attention(q, k, v, meta, backend=backend, plan=plan, validate=False, return_lse=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (compiles the Triton kernels) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = step()
    # the next step: metadata, plan and q copied into the captured buffers
    m2 = meta2.to(DEV)
    for dst, src in zip(meta.tensors(), m2.tensors()):
        dst.copy_(src)
    plan2 = plan_tree_attention(m2, hq, hk, head_dim=d, capacity=cap)
    plan2.copy_into(plan)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = mk.tree_attention(q, k, v, m2, backend=backend, return_lse=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert_close_to_reference("out", out, _reference(q, k, v, m2)[0], **tolerance(dtype))


def test_misaligned_stride_warns_once():
    """A head stride that is not a multiple of 8 elements sends the CUDA launch to the scalar kernel:
    one warning per process, and the result is still right."""
    _backend("cuda")
    import multiverse_kernels.backends.cuda as cb

    f, groups = sampling_forest(prompt=64, samples=2, gen_len=2)
    meta = f.metadata(groups).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 64, torch.float16, device=DEV)
    qq = torch.zeros(q.shape[0], 4, 68, dtype=q.dtype, device=DEV)[..., :64]
    qq.copy_(q)  # row stride 4 * 68, head stride 68: not multiples of 8
    cb._WARNED.clear()
    with pytest.warns(UserWarning, match="scalar"):
        out = mk.tree_attention(qq, k, v, meta, backend="cuda")
    assert_close_to_reference("out", out, _reference(q, k, v, meta)[0], **tolerance(torch.float16))
