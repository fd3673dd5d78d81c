"""The measurement helper (multiverse_kernels/backends/triton/_measure.py), the one module that hooks
Triton internals, on the Triton version of this environment (CI runs this file on Triton 3.8 with the
pinned torch and on Triton 3.6 with torch 2.11, the GPU image's versions: .ci/run).

* In this process the kernels are interpreted (tests/conftest.py): the load counter sees every K/V load
  and is removed afterwards.
* In a child process with ``TRITON_INTERPRET=0`` (kernels compiled, as on a GPU machine) the KV-bytes
  hook still counts by running interpreted copies, and leaves the compiled kernels, ``JITFunction`` and
  ``triton.language`` exactly as they were (a compile afterwards works).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from _triton_interp import triton_interpreter  # noqa: F401  (module fixture)

from multiverse_kernels.backends import resolve
from multiverse_kernels.planning import plan_kv_tokens
from multiverse_kernels.testing import make_inputs, sampling_forest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_count_loads_counts_and_unhooks():
    from triton.runtime.interpreter import interpreter_builder

    from multiverse_kernels.backends.triton._measure import count_loads

    f, groups = sampling_forest(prompt=40, samples=4, gen_len=3, page_size=4)
    meta = f.metadata(groups)
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 64, torch.float16)
    before = vars(interpreter_builder).get("create_masked_load")
    with count_loads({"k": k, "v": v, "q": q}) as tally:
        mk_out = resolve("tree_attention", "triton", q.device)(q, k, v, meta, 0.125)
    assert mk_out[0].shape == q.shape
    per_cache = plan_kv_tokens(meta) * 2 * 64 * 2  # tokens x Hk x D x bytes, every token once
    assert tally["k"] == per_cache and tally["v"] == per_cache
    assert tally["q"] >= q.numel() * 2  # every query row at least once (once per item that reads it)
    assert vars(interpreter_builder).get("create_masked_load") is before


_CHILD = r"""
import json, sys, torch, triton, triton.language as tl
from triton.runtime import JITFunction
import importlib
import multiverse_kernels.backends.triton as tb
tta = importlib.import_module("multiverse_kernels.backends.triton.tree_attention")
from multiverse_kernels.planning import plan_kv_tokens
from multiverse_kernels.testing import make_inputs, sampling_forest

def snapshot():
    return {f"{n}.{k}": id(v) for n, o in (("tl", tl), ("core", tl.core), ("math", tl.math),
                                         ("tensor", tl.core.tensor)) for k, v in vars(o).items()}

kern = tta._tree_attn_kernel
call = vars(JITFunction).get("__call__")
f, groups = sampling_forest(prompt=40, samples=4, gen_len=3, page_size=4)
meta = f.metadata(groups)
q, k, v = make_inputs(meta, f.num_pages, 4, 2, 64, torch.float16)
first = tb.tree_attention_kv_bytes(q, k, v, meta, 0.125)  # also triton's first-use lazy imports
before = snapshot()
counted = tb.tree_attention_kv_bytes(q, k, v, meta, 0.125)
after = snapshot()
print(json.dumps(dict(
    compiled_before=isinstance(kern, JITFunction), interpreted_flag=tb.INTERPRETED,
    counted=counted, first=first, expected=plan_kv_tokens(meta) * 2 * 2 * 64 * 2,
    kernel_restored=tta._tree_attn_kernel is kern, call_restored=vars(JITFunction).get("__call__") is call,
    lang_changed=sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),
    triton=triton.__version__)))
"""


def test_kv_bytes_in_a_compiled_process_restores_everything(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["compiled_before"] and not r["interpreted_flag"]
    assert r["counted"] == r["expected"] == r["first"], r
    assert r["kernel_restored"] and r["call_restored"], r
    assert r["lang_changed"] == [], r


def test_compiled_process_rejects_cpu_tensors_clearly(tmp_path):
    code = ("import torch, multiverse_kernels as mk\n"
            "from multiverse_kernels.testing import make_inputs, sampling_forest\n"
            "f, g = sampling_forest(prompt=8, samples=2, gen_len=2)\n"
            "m = f.metadata(g)\n"
            "q, k, v = make_inputs(m, f.num_pages, 4, 2, 64, torch.float16)\n"
            "mk.tree_attention(q, k, v, m, backend='triton')\n")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert res.returncode != 0
    assert "triton" in res.stderr and "cpu" in res.stderr.lower(), res.stderr[-2000:]


@pytest.mark.parametrize("kernel", ["_tree_attn_kernel"])
def test_kernels_are_public_triton_jit(kernel):
    """Kernels are @triton.jit objects (interpreted here because TRITON_INTERPRET=1 at import)."""
    import importlib

    import triton

    tta = importlib.import_module("multiverse_kernels.backends.triton.tree_attention")
    k = getattr(tta, kernel)
    assert isinstance(k, triton.runtime.KernelInterface)
