"""CUDA backend (multiverse_kernels._C_cuda): what only it has (its kv-byte counter, a CUDA-graph capture
of its run step). Its comparisons with the reference on random forests are the ``cuda`` cases of
tests/ops/test_<op>.py (test_tree_attention.py, test_tree_attention_backward.py, test_merge_states.py,
test_append_paged_kv.py).

Needs a CUDA GPU and the built CUDA extension; elsewhere every test is SKIPPED with the reason (never
reported as passed). Run them on a GPU machine with ``python -m multiverse_kernels.gpu_run`` (docs/gpu.md).
Outputs are poisoned with NaN (the ``poisoned`` fixture).
"""

from __future__ import annotations

import pytest
import torch

from multiverse_kernels.ops import tree_attention
from multiverse_kernels.planning import PlanCapacity, plan_kv_tokens, plan_tree_attention
from multiverse_kernels.testing import NO_GPU_REASON, make_inputs, sampling_forest

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned")]

if not torch.cuda.is_available():
    pytest.skip(NO_GPU_REASON,
                allow_module_level=True)
try:
    from multiverse_kernels.backends import cuda as cuda_backend  # noqa: F401
except (ImportError, OSError, RuntimeError) as e:
    pytest.skip(f"CUDA extension not built ({e}); see docs/build.md", allow_module_level=True)

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_bytes_hook(dtype):
    from multiverse_kernels.backends import resolve

    hook = resolve("tree_attention_kv_bytes", "cuda", torch.device(DEV))
    f, groups = sampling_forest(prompt=1000, samples=16, gen_len=9)
    meta = f.metadata(groups).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, 32, 8, 128, dtype, device=DEV)
    counted = hook(q, k, v, meta, 0.1)
    if dtype != torch.float32:  # tensor-core kernel: each chunk's K/V loaded once for its <= 64 rows
        assert counted == plan_kv_tokens(meta) * 2 * 8 * 128 * k.element_size()
    else:  # scalar kernel (counted at its loads): every packed row reads the tokens it sees
        from multiverse_kernels.backends.cuda import _plan

        p = _plan(q, k, meta)
        vis = 0
        for w in range(p.num_items):
            kv0, ln = int(p.item_kv_start[w]), int(p.item_kv_len[w])
            r0, nr = int(p.item_reader_start[w]), int(p.item_num_readers[w])
            vis += sum(min(max(int(p.reader_limit[r]) - kv0, 0), ln) for r in range(r0, r0 + nr))
        assert counted == 32 * vis * 2 * 128 * k.element_size()


def test_cuda_graph_capture_and_replay():
    """The run step (attention + merge over padded plan buffers) is capturable; a replay after new
    q values are copied in gives the result of a fresh call."""
    from multiverse_kernels.backends.cpu._ext import run_tree_attention

    hq, hk, d = 32, 8, 128
    f, groups = sampling_forest(prompt=500, samples=8, gen_len=5)
    meta = f.metadata(groups).to(DEV)
    q, k, v = make_inputs(meta, f.num_pages, hq, hk, d, torch.float16, device=DEV)
    plan = plan_tree_attention(meta, hq, hk, head_dim=d, capacity=PlanCapacity(4096, 4096, 4096, 64))
    run_tree_attention(q, k, v, meta, d ** -0.5, plan)  # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = run_tree_attention(q, k, v, meta, d ** -0.5, plan)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    ref, ref_lse = tree_attention(q, k, v, meta, backend="cuda", return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
