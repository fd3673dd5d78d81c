"""The fork/join driver (no model): structure, positions, per-step visibility, page sharing, errors."""

import pytest
import torch
from _multiverse_script import ScriptPolicy, prompt, run

import multiverse_kernels as mk
from multiverse_kernels.multiverse import DriverError, MultiverseDriver, MultiverseTags, parse

V = 40
TAGS = MultiverseTags(*range(V, V + 10))


def slot_to_flat(drv: MultiverseDriver, index: dict[int, torch.Tensor]) -> dict[int, int]:
    """Flat cache slot of every stored token -> its index in the flat (training-order) sequence."""
    ps = drv.forest.page_size
    out = {}
    for node, flat in index.items():
        pages = drv.forest.node_pages(node)
        for j, fi in enumerate(flat.tolist()):
            out[pages[j // ps] * ps + j % ps] = fi
    return out


def check_run(drv: MultiverseDriver, batches) -> torch.Tensor:
    ids, pos, index = drv.sequence()
    s = parse(ids, TAGS)
    # the driver's positions are the Multiverse positions of the flat sequence
    assert torch.equal(s.position_ids, pos)
    full = s.dense_mask()
    slots = slot_to_flat(drv, index)
    # every token is stored exactly once, and no page is spent beyond what the nodes need
    assert len(slots) == ids.numel() == drv.unique_kv_tokens()
    ps = drv.forest.page_size
    need = sum(-(-drv.forest.node_len(n) // ps) for n in index)
    assert drv.forest.num_pages - drv.forest.num_free_pages == need
    # at every step, each query row sees exactly the keys the Multiverse mask allows
    for b in batches:
        meta = b.meta
        meta.validate(num_pages=drv.forest.num_pages)
        keys = torch.tensor([slots[int(x)] for x in mk.key_slots(meta)], dtype=torch.long)
        m = mk.dense_mask(meta)
        qo = meta.qo_indptr.tolist()
        for g, info in enumerate(b.branches):
            node_flat = index[info.node]
            for r in range(qo[g], qo[g + 1]):
                j = info.tokens_in_node - (qo[g + 1] - r)  # token index in its node
                fr = int(node_flat[j])
                assert int(b.input_ids[r]) == int(ids[fr]) and int(b.position_ids[r]) == int(pos[fr])
                got = set(keys[m[r]].tolist())
                want = set(full[fr].nonzero().flatten().tolist())
                assert got == want, (g, r)
    return ids


@pytest.mark.parametrize("seed", range(10))
def test_random_generations(seed):
    page_size = [1, 16, 4][seed % 3]
    max_depth = [None, 1, 0, 2][seed % 4]
    order = torch.randperm(4096, generator=torch.Generator().manual_seed(seed)).tolist()
    drv = MultiverseDriver(TAGS, num_pages=4096, page_size=page_size, max_depth=max_depth, page_order=order)
    pol = ScriptPolicy(TAGS, seed, V, nest=2 + seed % 2, max_paths=1 + seed % 4, chunk=1 + seed % 3,
                       concl_nest=seed % 2 == 1)
    batches = run(drv, pol, prompt(TAGS, seed, V, paths=1 + seed % 4))
    ids = check_run(drv, batches)
    if seed in (1, 3, 7):  # these scripts open blocks inside conclusions
        assert any(b.parent >= 0 and b.parent_path < 0 for b in parse(ids, TAGS).blocks)
    widths = [len(b.branches) for b in batches]
    if seed % 3:  # scripted tokens were fed in extend steps (q_len > 1 after the prefill)
        assert any(b.meta.total_q > len(b.branches) for b in batches[1:])
    if max_depth == 0:
        assert max(widths) == 1  # everything serial
    elif max_depth is None and seed % 4 > 0:
        assert max(widths) >= 1 + seed % 4  # the paths of the top block run side by side
    assert drv.num_forks >= 1 and drv.num_forks == drv.num_joins


def test_decode_metadata_of_a_fork():
    drv = MultiverseDriver(TAGS, num_pages=64, page_size=4)
    P, PE, G, GE, OS, OE, PA, PAE, C, CE = TAGS.ids()
    b = drv.start([1, 2, 3, P, G, OS, 4, OE, OS, 5, OE, OS, 6, OE, GE])
    assert b.meta.qo_indptr.tolist() == [0, 15] and b.position_ids.tolist() == list(range(15))
    b = drv.step([0])  # ignored: the root forks at </Goal>
    assert [i.kind for i in b.branches] == ["path"] * 3
    assert b.input_ids.tolist() == [PA] * 3 and b.position_ids.tolist() == [15] * 3
    assert b.meta.vis_nodes.tolist() == [0, 1, 0, 2, 0, 3] and b.meta.qo_indptr.tolist() == [0, 1, 2, 3]
    b = drv.step([7, 8, 9])
    assert b.input_ids.tolist() == [7, 8, 9] and b.position_ids.tolist() == [16] * 3
    b = drv.step([PAE, 10, PAE])  # paths 1 and 3 end with </Path>
    b = drv.step([0, 11, 0])
    assert [i.branch for i in b.branches] == [2] and b.input_ids.tolist() == [11]
    b = drv.step([PAE])
    b = drv.step([0])
    # the join: one conclusion node that sees the trunk and all three paths, starting with <Conclusion>
    assert b.input_ids.tolist() == [C] and b.branches[0].kind == "conclusion"
    assert b.position_ids.tolist() == [14 + 5 + 1]  # </Goal> at 14, longest path (2) is 15..19
    assert b.meta.vis_nodes.tolist() == [0, 1, 2, 3, 4]
    assert drv.forest.node_len(0) == 15  # the trunk is stored once, never copied


@pytest.mark.parametrize("bad, words", [
    ("trunk_path_end", "</Path> without an open <Path>"),
    ("trunk_path", "<Path> not opened by the driver"),
    ("path_conclusion", "<Conclusion> not opened by the driver"),
    ("path_parallel_end", "</Parallel> while a path is open"),
])
def test_structure_errors(bad, words):
    P, PE, G, GE, OS, OE, PA, PAE, C, CE = TAGS.ids()
    drv = MultiverseDriver(TAGS, num_pages=64, page_size=1)
    if bad.startswith("trunk"):
        drv.start([1, 2])
        with pytest.raises(DriverError, match=words):
            drv.step([PAE if bad == "trunk_path_end" else PA])
        return
    drv.start([1, P, G, OS, OE, GE])
    drv.step([0])
    with pytest.raises(DriverError, match=words):
        drv.step([C if bad == "path_conclusion" else PE])


def test_argument_errors():
    P, PE, G, GE, OS, OE, PA, PAE, C, CE = TAGS.ids()
    drv = MultiverseDriver(TAGS, num_pages=64)
    with pytest.raises(DriverError, match="tokens after </Goal>"):
        drv.start([P, G, GE, 3])
    drv = MultiverseDriver(TAGS, num_pages=64)
    with pytest.raises(ValueError, match="prompt"):
        drv.start([])
    drv.start([1, 2])
    with pytest.raises(ValueError, match="next_tokens: expected 1"):
        drv.step([1, 2])
    with pytest.raises(ValueError, match="max_depth"):
        MultiverseDriver(TAGS, num_pages=4, max_depth=-1)
    drv = MultiverseDriver(TAGS, num_pages=2, page_size=1)
    with pytest.raises(mk.OutOfPages):
        drv.start([1, 2, 3])
