"""The NaN policy (docs/errors.md), a contract every backend's kernel must pass (the cpu kernel's
rewrite included):

* a NaN or +-Inf in a query row, or in a K token the row sees, makes that (row, head) NaN: every
  output dim and the lse;
* a NaN or +-Inf in a V token makes non-finite exactly the output dims of the (row, head) pairs that
  see the token (lse stays finite);
* nothing crosses the mask: rows that do not see the poisoned token are finite and equal to the clean
  result; a row that sees nothing keeps out = 0, lse = -inf;
* a non-finite ``sm_scale`` is rejected (tests/contracts/test_errors.py).
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import TRITON, needs_triton, triton_interpreter  # noqa: F401  (module fixture)

import multiverse_kernels as mk
from multiverse_kernels.testing import design_example_forest, random_forest, tolerance

BACKENDS = ("reference", "cpu", *TRITON)
SLOW = pytest.mark.slow  # the full matrix (default run: the design example, NaN and +Inf)
D, HQ, HK = 64, 4, 2


def _case(seed: int):
    if seed == 0:
        f, groups = design_example_forest()
    else:
        f, groups = random_forest(seed, page_size=4, max_len=20, max_nodes=8)
    meta = f.metadata(groups)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(meta.total_q, HQ, D, generator=g)
    kc = torch.randn(f.num_pages, meta.page_size, HK, D, generator=g)
    vc = torch.randn(kc.shape, generator=g)
    return meta, q, kc, vc


def _poison_token(meta, rng: torch.Generator) -> int | None:
    """A random token slot of a node that at least one row sees (None if the forest reads nothing)."""
    lens = meta.node_len.tolist()
    seen = set(meta.vis_nodes.tolist())
    cands = [n for n in range(meta.num_nodes) if lens[n] > 0 and n in seen]
    if not cands:
        return None
    n = cands[int(torch.randint(len(cands), (1,), generator=rng))]
    slots = meta.node_token_slots(n)
    return int(slots[int(torch.randint(slots.numel(), (1,), generator=rng))])


def _check(out, lse, ref_out, ref_lse, clean_out, clean_lse):
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref_out))
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_out)
    torch.testing.assert_close(out[fin], ref_out[fin], **tolerance(torch.float32))
    # rows the poison does not reach are unchanged from the clean run
    untouched = torch.isfinite(ref_out).all(-1)
    torch.testing.assert_close(out[untouched], clean_out[untouched], **tolerance(torch.float32))
    torch.testing.assert_close(lse[untouched], clean_lse[untouched], **tolerance(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ("k", "v", "q"))
@pytest.mark.parametrize("value", (float("nan"), float("inf"), pytest.param(-float("inf"), marks=SLOW)))
@pytest.mark.parametrize("seed", (0, pytest.param(1, marks=SLOW), pytest.param(2, marks=SLOW)))
def test_nan_policy(backend, where, value, seed):
    meta, q, kc, vc = _case(seed)
    rng = torch.Generator().manual_seed(100 + seed)
    clean_out, clean_lse = mk.tree_attention(q, kc, vc, meta, backend=backend, return_lse=True)
    if where == "q":
        if q.shape[0] == 0:
            pytest.skip("this forest has no query rows")
        q = q.clone()
        q[int(torch.randint(q.shape[0], (1,), generator=rng)), 1, 5] = value
    else:
        slot = _poison_token(meta, rng)
        if slot is None:
            pytest.skip("this forest reads no token")
        cache = (kc if where == "k" else vc).clone()
        cache.view(-1, HK, D)[slot, 0, 7] = value  # KV head 0: query heads 0 and 1 only
        kc, vc = (cache, vc) if where == "k" else (kc, cache)
    ref_out, ref_lse = mk.tree_attention(q, kc, vc, meta, backend="reference", return_lse=True)
    out, lse = mk.tree_attention(q, kc, vc, meta, backend=backend, return_lse=True)
    # the reference states the policy: check it against the dense mask once
    mask = mk.dense_mask(meta)  # [total_q, total keys of the forest]
    if where in ("k", "v"):
        row_sees = torch.zeros(q.shape[0], dtype=torch.bool)
        for r in range(q.shape[0]):
            row_sees[r] = bool(mask[r].any()) and _row_sees_slot(meta, r, slot)
        bad_rows = ~torch.isfinite(ref_out[:, :2]).all(-1).all(-1)
        assert torch.equal(bad_rows, row_sees), (bad_rows, row_sees)
        assert bool(torch.isfinite(ref_out[:, 2:]).all())  # other KV head: untouched
        if where == "v":
            assert bool(torch.isfinite(ref_lse[torch.isfinite(clean_lse)]).all())
            assert bool(torch.isfinite(ref_out[:, :, [d for d in range(D) if d != 7]]).all())
        else:
            assert bool(torch.isnan(ref_out[row_sees, :2]).all())
            assert bool(torch.isnan(ref_lse[row_sees, :2]).all())
    assert bool((ref_lse[clean_lse == float("-inf")] == float("-inf")).all())  # saw nothing: still
    _check(out, lse, ref_out, ref_lse, clean_out, clean_lse)


def _row_sees_slot(meta, r: int, slot: int) -> bool:
    qo = meta.qo_indptr.tolist()
    g = max(i for i in range(meta.num_groups) if qo[i] <= r < qo[i + 1]) if qo[-1] else None
    vi = meta.vis_indptr.tolist()
    nodes = meta.vis_nodes.tolist()[vi[g]:vi[g + 1]]
    q_len, i = qo[g + 1] - qo[g], r - qo[g]
    for n in nodes:
        slots = meta.node_token_slots(n).tolist()
        if slot in slots:
            j = slots.index(slot)
            if n != nodes[-1] or (meta.own_full is not None and bool(meta.own_full[g])):
                return True
            return j <= len(slots) - q_len + i
    return False


@pytest.mark.parametrize("backend", ("cpu", *TRITON))
def test_nan_policy_fp16(backend):
    meta, q, kc, vc = _case(0)
    q, kc, vc = q.half(), kc.half(), vc.half()
    slot = int(meta.node_token_slots(int(meta.vis_nodes[-1]))[-1])  # the conclusion's last token
    vc = vc.clone()
    vc.view(-1, HK, D)[slot, 0, 3] = float("nan")
    kc = kc.clone()
    kc.view(-1, HK, D)[slot, 1, 3] = float("inf")
    ref_out, ref_lse = mk.tree_attention(q, kc, vc, meta, backend="reference", return_lse=True)
    out, lse = mk.tree_attention(q, kc, vc, meta, backend=backend, return_lse=True)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref_out))
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    assert not bool(torch.isfinite(ref_out).all()) and bool(torch.isfinite(ref_out[:-1]).all())
