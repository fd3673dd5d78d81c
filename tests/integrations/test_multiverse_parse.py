"""Multiverse parse: positions, visibility, the packed forest, errors, tags from a tokenizer."""

import pytest
import torch
import torch.nn.functional as F

import multiverse_kernels as mk
from multiverse_kernels.multiverse import MultiverseParseError, MultiverseTags, parse
from multiverse_kernels.multiverse.synthetic import random_sequence
from multiverse_kernels.testing import tolerance

V = 32
TAGS = MultiverseTags(*range(V, V + 10))
P, PE, G, GE, OS, OE, PA, PAE, C, CE = TAGS.ids()


# --------------------------------------------------------------------- a naive token-level model
def naive(seq: list[int]) -> tuple[list[int], torch.Tensor]:
    """Token by token: positions, and each token's (block, path) memberships -> the L x L mask."""
    pos, member = [], []
    stack: list[dict] = []
    nblocks = 0
    prev = -1
    for tok in seq:
        p = prev + 1
        if tok == P:
            stack.append(dict(id=nblocks, G=None, open=False, restarted=False, longest=None, npaths=0))
            nblocks += 1
        elif tok == PA:
            b = stack[-1]
            b["open"], b["restarted"] = True, b["G"] is not None
            if b["restarted"]:
                p = b["G"] + 1
        elif tok == C:
            b = stack[-1]
            if b["G"] is not None and b["longest"] is not None:
                p = b["G"] + b["longest"] + 1
        elif tok == GE:
            stack[-1]["G"] = p
        # membership: every open path of every open block (the <Path>/</Path> markers included)
        member.append({b["id"]: b["npaths"] for b in stack if b["open"]})
        if tok == PAE:
            b = stack[-1]
            if b["restarted"]:
                b["longest"] = max(b["longest"] or 0, p - b["G"])
            b["open"] = False
            b["npaths"] += 1
        elif tok == PE:
            stack.pop()
        pos.append(p)
        prev = p
    L = len(seq)
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(i + 1):
            mask[i, j] = all(member[j].get(b, pi) == pi for b, pi in member[i].items())
    return pos, mask


def check_structure(seq):
    s = parse(seq, TAGS)
    pos, mask = naive(seq)
    assert s.position_ids.dtype == torch.int64
    assert s.position_ids.tolist() == pos
    dm = s.dense_mask()
    assert dm.dtype == torch.bool and dm.shape == (len(seq), len(seq))
    assert torch.equal(dm, mask)
    # the packed forest encodes the same visibility (the library's own dense_mask of the metadata)
    meta = s.metadata()
    meta.validate(num_pages=len(seq))
    assert torch.equal(mk.dense_mask(meta), mask)
    assert int(meta.node_len.sum()) == len(seq)
    # nodes: cut only at <Path> and after </Path>
    npaths = sum(1 for t in seq if t == PA)
    assert s.num_nodes <= 2 * npaths + 1
    return s


# --------------------------------------------------------------------- hand-written sequences
def test_single_block_positions_and_mask():
    #      0  1  2  3  4  5  6  7  8  9   10  11  12 13 14 15   16 17 18  19  20 21  22  23 24
    seq = [1, 2, P, G, 3, OS, 4, OE, OS, 5, OE, GE, PA, 6, 7, PAE, PA, 8, PAE, C, 10, CE, PE, 11]
    s = check_structure(seq)
    # </Goal> at position 11; path 1 = 12..15 (length 4), path 2 = 12..14 (length 3);
    # conclusion at 11 + 4 + 1 = 16, then consecutive.
    assert s.position_ids.tolist() == list(range(12)) + [12, 13, 14, 15, 12, 13, 14] + [16, 17, 18, 19, 20]
    dm = s.dense_mask()
    assert not dm[16:19, 12:16].any()  # path 2 does not see path 1
    assert dm[16:19, :12].all()  # but sees the goal
    assert dm[19, :20].all()  # the conclusion sees both paths
    b = s.blocks[0]
    assert (b.start, b.end, b.goal_end, b.outlines) == (2, 22, 11, 2)
    assert b.paths == [(12, 15), (16, 18)] and b.conclusion_start == 19


def test_gaps_between_paths():
    seq = [P, G, OS, 1, OE, OS, 2, OE, GE, PA, 3, 4, PAE, 5, 6, PA, 7, PAE, 8, PA, 9, PAE, C, 10, CE, PE]
    s = check_structure(seq)
    dm = s.dense_mask()
    # gap tokens 13, 14 see path 1; path 2 (15..17) sees the gap but not path 1
    assert dm[13, 9:13].all() and dm[14, 9:13].all()
    assert dm[15:18, 13:15].all() and not dm[15:18, 9:13].any()
    # path 3 (19..21) sees neither path 1 nor path 2, but both gaps
    assert not dm[19:22, 9:13].any() and not dm[19:22, 15:18].any()
    assert dm[19:22, 13:15].all() and dm[19:22, 18].all()
    pos = s.position_ids.tolist()
    assert pos[8] == 8 and pos[9] == 9 and pos[12] == 12  # </Goal> 8, path 1 9..12 (length 4)
    assert pos[13:15] == [13, 14]  # gap continues from </Path>
    assert pos[15:18] == [9, 10, 11] and pos[18] == 12 and pos[19:22] == [9, 10, 11]
    assert pos[22] == 8 + 4 + 1


def test_block_without_goal_does_not_restart():
    seq = [1, P, PA, 2, 3, PAE, PA, 4, PAE, C, 5, CE, PE, 6]
    s = check_structure(seq)
    assert s.position_ids.tolist() == list(range(len(seq)))
    assert not s.dense_mask()[6:9, 2:6].any()  # still isolated


def test_nested_blocks():
    seq = [1, P, G, OS, OE, OS, OE, GE,                 # 0..7, </Goal> at position 7
           PA, 2, P, G, OS, OE, OS, OE, GE,              # 8..16: path 1 opens a nested block, </Goal> pos 16
           PA, 3, 4, PAE, PA, 5, PAE, C, 6, CE, PE,    # 17..27 nested paths and conclusion
           7, PAE,                                     # 28, 29
           PA, 8, PAE,                                 # 30..32 outer path 2
           C, 9, CE, PE]                               # 33..36
    s = check_structure(seq)
    pos = s.position_ids.tolist()
    assert pos[8] == 8 and pos[16] == 16
    assert pos[17:21] == [17, 18, 19, 20] and pos[21:24] == [17, 18, 19]
    assert pos[24] == 16 + 4 + 1 and pos[27] == 24 and pos[29] == 26  # nested conclusion, outer </Path>
    assert pos[30:33] == [8, 9, 10]  # outer path 2 restarts at the outer </Goal> + 1
    assert pos[33] == 7 + (26 - 7) + 1  # longest outer path is path 1 (19 long)
    dm = s.dense_mask()
    assert not dm[21:24, 17:21].any()  # nested siblings
    assert dm[24, 17:24].all()  # nested conclusion sees both nested paths
    assert not dm[30:33, 8:30].any()  # outer path 2 sees nothing of outer path 1 (nested block included)
    assert dm[33, :33].all()
    assert s.blocks[1].parent == 0 and s.blocks[1].parent_path == 0


def test_empty_and_plain_sequences():
    s = check_structure([])
    assert s.num_nodes == 0 and s.position_ids.numel() == 0
    s = check_structure([3, 1, 4, 1, 5])
    assert s.num_nodes == 1 and s.position_ids.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seq, index, words", [
    ([1, PAE], 1, "</Path> without an open <Path>"),
    ([1, PA, 2, PAE], 1, "<Path> outside any <Parallel>"),
    ([P, PA, 1, PE], 3, "</Parallel> while <Path> at index 1"),
    ([P, PA, 1, PAE], 0, "unclosed <Parallel>"),
    ([P, G, GE, PA, 1], 3, "unclosed <Path>"),
    ([P, PA, PA], 2, "while <Path> at index 1 is open"),
    ([PE], 0, "</Parallel> outside any <Parallel>"),
    ([P, G, 1, PA], 3, "<Path> while <Goal> at index 1 is open"),
    ([P, PA, 1, P, PA, 2, PAE, PAE, PE], 7, "</Path> without an open <Path>"),  # inner block still open
    ([P, C, 1, PE], 3, "</Parallel> while <Conclusion> at index 1 is open"),
    ([1, GE], 1, "</Goal> outside any <Parallel>"),
    ([P, GE, PE], 1, "</Goal> without an open <Goal>"),
])
def test_malformed_inputs_name_the_token(seq, index, words):
    with pytest.raises(MultiverseParseError, match=words) as e:
        parse(seq, TAGS)
    assert e.value.index == index
    assert f"token_ids[{index}]" in str(e.value)


def test_partial_sequences():
    seq = [1, P, G, OS, OE, GE, PA, 2, PAE, PA, 3]
    with pytest.raises(MultiverseParseError):
        parse(seq, TAGS)
    s = parse(seq, TAGS, partial=True)
    assert s.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7]
    assert not s.dense_mask()[9:, 6:9].any()
    assert torch.equal(mk.dense_mask(s.metadata()), s.dense_mask())


def test_bad_arguments():
    with pytest.raises(ValueError, match="token_ids"):
        parse(torch.zeros(2, 2, dtype=torch.long), TAGS)
    with pytest.raises(ValueError, match="token_ids"):
        parse(torch.zeros(3), TAGS)
    with pytest.raises(ValueError, match="conclusion_end: token id 0 is also used by parallel_start"):
        MultiverseTags(*range(9), 0)
    with pytest.raises(ValueError, match="goal_start"):
        MultiverseTags(0, 1, -2, 3, 4, 5, 6, 7, 8, 9)


# --------------------------------------------------------------------- random well-formed sequences
@pytest.mark.parametrize("seed", range(60))
def test_random_sequences_against_naive(seed):
    seq = random_sequence(seed, TAGS, vocab=V, max_depth=1 + seed % 3, max_paths=1 + seed % 4,
                          goal_prob=[1.0, 0.7, 0.0][seed % 3])
    check_structure(seq)


def test_forest_size_does_not_grow_with_tokens():
    short = random_sequence(7, TAGS, vocab=V, max_text=2)
    long = [t for x in short for t in ([x] * (1 if x >= V else 20))]  # every text token x20
    a, b = parse(short, TAGS), parse(long, TAGS)
    assert a.num_nodes == b.num_nodes and a.vis_nodes.numel() == b.vis_nodes.numel()
    assert b.num_tokens > 10 * a.num_nodes


# --------------------------------------------------------------------- tree attention on the packed forest
def dense_reference(q, k, v, mask):
    hq, hk = q.shape[1], k.shape[1]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, enable_gqa=hq != hk)
    return out.transpose(0, 1)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_tree_attention_equals_dense_mask(seed, dtype):
    seq = random_sequence(100 + seed, TAGS, vocab=V, max_depth=2, max_paths=4)
    s = parse(seq, TAGS)
    L = s.num_tokens
    hq, hk, d = [(4, 2, 64), (8, 1, 128), (2, 2, 16), (4, 4, 256)][seed % 4]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(L, hq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(L, hk, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(L, hk, d, generator=gen, dtype=torch.float64).to(dtype)
    ref = dense_reference(q.double(), k.double(), v.double(), s.dense_mask()).to(dtype)
    out = s.attention(q, k, v, backend="reference")
    assert out.shape == (L, hq, d) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tolerance(dtype))
    # backend "auto" (the fastest backend available for CPU tensors) gives the same
    out_auto = s.attention(q, k, v, backend="auto")
    torch.testing.assert_close(out_auto, ref, **(tolerance(dtype) if dtype != torch.float32
                                                 else dict(atol=1e-4, rtol=1e-4)))


def test_attention_rejects_bad_shapes():
    s = parse([1, 2, 3], TAGS)
    x = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="k:"):
        s.attention(x, torch.randn(4, 2, 8), x)


# --------------------------------------------------------------------- tags from a local tokenizer
def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    from multiverse_kernels.multiverse import TAG_STRINGS

    words = ["[UNK]"] + [f"w{i}" for i in range(20)] + list(TAG_STRINGS.values())
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return tok


def test_tags_from_tokenizers_tokenizer():
    tok = _word_tokenizer()
    tags = MultiverseTags.from_tokenizer(tok)
    assert tags.path_start == tok.token_to_id("<Path>") and tags.conclusion_end == tok.token_to_id(
        "</Conclusion>")
    assert tags.name_of(tags.goal_end) == "</Goal>" and tags.name_of(0) is None


def test_tags_from_transformers_tokenizer():
    pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(), unk_token="[UNK]")
    tags = MultiverseTags.from_tokenizer(tok)
    text = "w1 <Parallel> <Goal> <Outline> w2 </Outline> </Goal> <Path> w3 </Path> <Conclusion> w4 " \
           "</Conclusion> </Parallel>"
    ids = tok(text)["input_ids"]
    s = parse(ids, tags)
    assert s.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert len(s.blocks) == 1 and s.blocks[0].outlines == 1


def test_tags_from_tokenizer_missing_tag():
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "<Parallel>": 1},
                                                           unk_token="[UNK]"))
    with pytest.raises(ValueError, match="</Parallel>"):
        MultiverseTags.from_tokenizer(tok)
