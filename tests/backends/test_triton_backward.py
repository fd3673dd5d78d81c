"""Triton tree-attention backward (dK/dV and dQ kernels) in the Triton interpreter: what only it has (the
autograd of ``tree_attention(backend="triton")`` dispatching to it, auto on CUDA preferring it, its
limits' named errors, a GRPO group through a tiny model). Its comparisons with the reference backward on
random forests are in tests/ops/test_tree_attention_backward.py.

See tests/_triton_interp.py for what the interpreter covers (bf16 math runs in fp32 on CPU); outputs are
poisoned with NaN for the module.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from _triton_interp import triton_interpreter  # noqa: F401  (module fixture)

import multiverse_kernels as mk
from multiverse_kernels.backends import available_backends, resolve
from multiverse_kernels.metadata import MetadataError
from multiverse_kernels.ops import tree_attention_backward
from multiverse_kernels.testing import (
    assert_close_to_reference,
    compact_pages,
    make_inputs,
    random_forest,
    sampling_forest,
)

# the Triton autograd against the reference's autograd on the same dtype (not float64): a little looser
# than testing.grad_tolerance
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=6e-3, rtol=6e-3),
            torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_uses_the_triton_backward(dtype, monkeypatch):
    """tree_attention(backend="triton") differentiates through out and lse with the Triton kernels;
    gradients equal the reference backend's autograd."""
    from multiverse_kernels import backends

    assert "triton" in available_backends("tree_attention_backward", "cpu")
    fn, devs = backends._IMPLS["tree_attention_backward"]["triton"]
    assert "cuda" in devs
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    monkeypatch.setitem(backends._IMPLS["tree_attention_backward"], "triton", (spy, devs))
    f, groups = random_forest(3, page_size=4, max_len=16, max_nodes=6)
    meta, num_pages = compact_pages(f.metadata(groups))
    grads = {}
    for backend in ("triton", "reference"):
        q, k, v = (t.requires_grad_() for t in make_inputs(meta, num_pages, 4, 2, 64, dtype, seed=1))
        out, lse = mk.tree_attention(q, k, v, meta, return_lse=True, backend=backend)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        live = torch.isfinite(lse)
        loss = (out.float() * w.float()).sum() + 0.3 * torch.where(live, lse, 0).sum()
        loss.backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    assert len(calls) == 1
    for name, a, b in zip(("dq", "dk", "dv"), grads["triton"], grads["reference"], strict=True):
        assert_close_to_reference(name, a, b, **GRAD_TOL[dtype])


def test_auto_on_cuda_prefers_triton_backward():
    from multiverse_kernels import backends

    backends._load()
    impl = backends._IMPLS["tree_attention_backward"]
    order = [b for b in backends.AUTO_ORDER["cuda"] if b in impl and "cuda" in impl[b][1]]
    assert order[0] == "triton", order  # auto on CUDA tensors resolves to the Triton backward
    assert resolve("tree_attention_backward", "triton", torch.device("cpu")) is impl["triton"][0]


def test_bad_inputs():
    f, groups = sampling_forest(prompt=8, samples=2, gen_len=2)
    meta = f.metadata(groups)
    for dtype, d, match in ((torch.float64, 64, "float16"), (torch.float32, 96, "head_dim")):
        q, k, v = make_inputs(meta, f.num_pages, 4, 2, d, dtype)
        out = torch.zeros_like(q)
        lse = torch.zeros(q.shape[:2])
        with pytest.raises(MetadataError, match=match):
            tree_attention_backward(out, q, k, v, out, lse, meta, backend="triton")
    q, k, v = make_inputs(meta, f.num_pages, 64, 1, 256, torch.float16)
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:2])
    with pytest.raises(MetadataError, match="GQA group"):
        tree_attention_backward(out, q, k, v, out, lse, meta, backend="triton")


def test_rl_group_through_a_tiny_model():
    """A GRPO group packed (multiverse_kernels.rl) through a tiny transformers model whose attention
    runs forward and backward on the triton backend: log-probs and parameter gradients equal the
    unpacked runs' (float32)."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from test_rl import grpo_loss, tiny_model, unpacked_logprobs

    from multiverse_kernels.rl import pack_group, rollout_forward

    model, alone = tiny_model(head_dim=64)
    g = torch.Generator().manual_seed(4)
    p = pack_group(torch.randint(0, 50, (10,), generator=g),
                   [torch.randint(0, 50, (n,), generator=g) for n in (4, 1, 6)])
    lp = p.token_logprobs(rollout_forward(model, p, backend="triton"))
    adv = torch.tensor([1.0, -0.5, 0.25])
    grpo_loss(p.per_sequence(lp, trainable_only=True), adv).backward()
    for i, s in enumerate(p.sequences):
        ref = unpacked_logprobs(alone, p.token_ids[s])
        torch.testing.assert_close(lp[s][1:], ref, atol=5e-5, rtol=5e-5)
        grpo_loss([ref[10 - 1:]], adv[i:i + 1]).backward()
    for (name, a), b in zip(model.named_parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=lambda m, nm=name: f"{nm}: {m}")
