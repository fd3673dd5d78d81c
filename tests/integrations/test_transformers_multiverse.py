"""A stock transformers causal LM (tiny Qwen2 / Llama, random weights, nothing downloaded) generating
Multiverse branches over a KV forest through tree_attention, checked against the plain model with the
dense Multiverse mask (the way Multiverse trains) and against decoding each path alone."""

import copy

import pytest
import torch
from _multiverse_script import ScriptPolicy, prompt, run

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from multiverse_kernels.integrations.transformers import (  # noqa: E402
    ForestContext,
    ForestKVCache,
    cache_kwarg,
    forest_forward,
    kv_elements_read,
    packed_forward,
)
from multiverse_kernels.multiverse import MultiverseDriver, MultiverseTags, parse  # noqa: E402

V = 64
TAGS = MultiverseTags(*range(V, V + 10))


def tiny_model(arch: str = "qwen2", dtype=torch.float64, seed: int = 0):
    common = dict(vocab_size=V + 10, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init, so logits differ clearly per context
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    return model, ref


def dense_logits(ref, ids, pos):
    """The plain model on the flat sequence with the Multiverse dense mask as a 4D mask."""
    mask = parse(ids, TAGS).dense_mask()
    with torch.no_grad():
        return ref(input_ids=ids[None], position_ids=pos[None], attention_mask=mask[None, None],
                   use_cache=False).logits[0]


def generate(model, page_size, backend, seed=0, nest=1, chunk=1, max_depth=None, paths=3,
             concl_nest=False):
    drv = MultiverseDriver(TAGS, num_pages=2048, page_size=page_size, max_depth=max_depth)
    cache = ForestKVCache.for_model(model, 2048, page_size)
    rows: dict[tuple[int, int], torch.Tensor] = {}

    def forward(b):
        with torch.no_grad():
            lg = forest_forward(model, b.input_ids, b.position_ids, b.meta, cache, b.token_node,
                                b.token_pos, backend=backend)
        qo = b.meta.qo_indptr.tolist()
        for g, info in enumerate(b.branches):
            for r in range(qo[g], qo[g + 1]):
                rows[(info.node, info.tokens_in_node - (qo[g + 1] - r))] = lg[r]
        return lg[b.last_rows, :V].argmax(-1).tolist()  # greedy among ordinary tokens

    pol = ScriptPolicy(TAGS, seed, V, nest=nest, max_paths=paths, chunk=chunk, nest_prob=1.0,
                       concl_nest=concl_nest)
    batches = run(drv, pol, prompt(TAGS, seed, V, paths=paths), forward)
    return drv, rows, batches


def tol(dtype):
    return dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("page_size, backend, dtype", [
    (1, "reference", torch.float64),
    (16, "reference", torch.float64),
    (1, "auto", torch.float32),
    (16, "auto", torch.float32),
])
def test_generation_equals_dense_mask_and_paths_alone(page_size, backend, dtype):
    model, ref = tiny_model(dtype=dtype)
    drv, rows, batches = generate(model, page_size, backend, seed=page_size)
    assert max(len(b.branches) for b in batches) == 3  # three paths decoded side by side
    ids, pos, index = drv.sequence()
    dense = dense_logits(ref, ids, pos)
    got = torch.stack([rows[(n, j)] for n, flat in index.items() for j in range(flat.numel())])
    want = torch.stack([dense[int(fi)] for n, flat in index.items() for fi in flat])
    torch.testing.assert_close(got, want, **tol(dtype))
    assert got.shape[0] == ids.numel() and not torch.isnan(got).any()

    # each path: decode it alone (prefill its trunk, then one token at a time with a plain KV cache)
    root = 0
    paths = drv._node_forks[root]
    assert len(paths) == 3
    trunk_ids, trunk_pos = drv.node_tokens(root)
    for p in paths:
        p_ids, p_pos = drv.node_tokens(p)
        kv = {cache_kwarg(ref): transformers.DynamicCache(config=ref.config)}  # no deprecated keyword
        with torch.no_grad():
            ref(input_ids=torch.tensor([trunk_ids]), position_ids=torch.tensor([trunk_pos]), use_cache=True,
                **kv)
            alone = [ref(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[q]]), use_cache=True,
                         **kv).logits[0, 0] for t, q in zip(p_ids, p_pos)]
        torch.testing.assert_close(torch.stack([rows[(p, j)] for j in range(len(p_ids))]),
                                   torch.stack(alone), **tol(dtype))
    # the join's conclusion differs from any single path's continuation: it really sees all paths
    concl = drv._node_next[root]
    assert drv.node_tokens(concl)[0][0] == TAGS.conclusion_start


@pytest.mark.parametrize("max_depth, chunk", [(None, 1), (None, 3), (1, 2)])
def test_nested_blocks_extend_and_serial(max_depth, chunk):
    model, ref = tiny_model(dtype=torch.float64, seed=1)
    drv, rows, batches = generate(model, 4, "reference", seed=5, nest=2, chunk=chunk, max_depth=max_depth,
                                  paths=2, concl_nest=True)
    assert drv.num_forks >= 4  # the top block, a nested block in each path and one in the conclusion
    blocks = parse(drv.sequence()[0], TAGS).blocks
    assert any(b.parent >= 0 and b.parent_path < 0 for b in blocks)  # a block inside a conclusion
    if chunk > 1:
        assert any(b.meta.total_q > len(b.branches) for b in batches[1:])  # extend steps
    ids, pos, index = drv.sequence()
    dense = dense_logits(ref, ids, pos)
    for n, flat in index.items():
        for j, fi in enumerate(flat.tolist()):
            torch.testing.assert_close(rows[(n, j)], dense[fi], **tol(torch.float64))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_forward_and_gradients(arch):
    from multiverse_kernels.multiverse.synthetic import random_sequence

    model, ref = tiny_model(arch, dtype=torch.float64, seed=2)
    seq = random_sequence(3, TAGS, vocab=V, max_depth=2, max_paths=3)
    s = parse(seq, TAGS)
    with torch.no_grad():
        want = dense_logits(ref, s.token_ids, s.position_ids)
        got = packed_forward(model, s, backend="reference")
        got_auto = packed_forward(model, s)
    torch.testing.assert_close(got, want, **tol(torch.float64))
    torch.testing.assert_close(got_auto, want, **tol(torch.float64))
    # training: the packed path backpropagates (tree_attention's autograd), matches the dense-mask grads
    target = torch.roll(s.token_ids, -1)
    for m, f in ((model, lambda: packed_forward(model, s)),
                 (ref, lambda: ref(input_ids=s.token_ids[None], position_ids=s.position_ids[None],
                                   attention_mask=s.dense_mask()[None, None], use_cache=False).logits[0])):
        m.zero_grad()
        torch.nn.functional.cross_entropy(f(), target).backward()
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-7, msg=name)


def test_packed_gradients_float32_cpu_backend():
    """float32 training step with the C++ cpu forward (+ the reference backward) against the float64
    dense-mask model's gradients, and the attention goes through tree_attention's autograd node."""
    from multiverse_kernels.backends import available_backends
    from multiverse_kernels.multiverse.synthetic import random_sequence

    if "cpu" not in available_backends("tree_attention", "cpu"):
        pytest.skip("the C++ cpu backend is not built")
    model, ref = tiny_model("qwen2", dtype=torch.float64, seed=4)
    model = model.float()
    s = parse(random_sequence(5, TAGS, vocab=V, max_depth=2, max_paths=3), TAGS)
    target = torch.roll(s.token_ids, -1)
    logits = packed_forward(model, s, backend="cpu")
    # the autograd graph holds tree_attention's backward node (not a chain of plain-torch ops)
    names, stack, seen = [], [logits.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        stack += [nxt for nxt, _ in fn.next_functions]
    assert any("tree_attention" in n.lower() for n in names), sorted(set(names))
    torch.nn.functional.cross_entropy(logits, target).backward()
    ref.zero_grad()
    dense = ref(input_ids=s.token_ids[None], position_ids=s.position_ids[None],
                attention_mask=s.dense_mask()[None, None], use_cache=False).logits[0]
    torch.nn.functional.cross_entropy(dense, target).backward()
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_llama_generation():
    model, ref = tiny_model("llama", dtype=torch.float64, seed=3)
    drv, rows, _ = generate(model, 1, "reference", seed=2)
    ids, pos, index = drv.sequence()
    dense = dense_logits(ref, ids, pos)
    for n, flat in index.items():
        for j, fi in enumerate(flat.tolist()):
            torch.testing.assert_close(rows[(n, j)], dense[fi], **tol(torch.float64))


def test_kv_read_counts():
    from multiverse_kernels.testing import multiverse_forest

    f, groups = multiverse_forest(prefix=64, paths=4, path_len=16, concl_len=2, page_size=16)
    meta = f.metadata(groups)
    # per group: 4 paths see 64 + 16, the conclusion 64 + 4*16 + 2; unique: every node once
    assert kv_elements_read(meta, per_group=True) == 4 * 80 + 130
    assert kv_elements_read(meta, per_group=False) == 64 + 64 + 2


def test_errors():
    model, _ = tiny_model(dtype=torch.float32)
    from multiverse_kernels.integrations.transformers import register

    model.set_attn_implementation(register())
    with pytest.raises(ValueError, match="multiverse=ForestContext"):
        model(input_ids=torch.tensor([[1, 2]]), use_cache=False)
    s = parse([1, 2, 3], TAGS)
    ctx = ForestContext(s.metadata(), packed=True)
    with pytest.raises(ValueError, match="batch size 1"):
        model(input_ids=torch.tensor([[1, 2, 3], [1, 2, 3]]), use_cache=False, multiverse=ctx)
    with pytest.raises(ValueError, match="paged mode needs"):
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False, multiverse=ForestContext(s.metadata()))


@pytest.mark.parametrize("page_size", [1, 16])
def test_unshared_metadata_and_measured_kv_bytes(page_size):
    import multiverse_kernels as mk
    from multiverse_kernels.integrations.transformers import kv_bytes_hook, unshared_metadata
    from multiverse_kernels.testing import make_inputs, multiverse_forest

    f, groups = multiverse_forest(prefix=48, paths=4, path_len=9, concl_len=3, page_size=page_size)
    meta = f.metadata(groups)
    un = unshared_metadata(meta)
    un.validate(num_pages=f.num_pages)
    # nothing shared: every listed node appears in exactly one group's list
    assert un.vis_nodes.tolist() == list(range(un.vis_nodes.numel()))
    assert kv_elements_read(un, per_group=False) == kv_elements_read(meta, per_group=True)
    q, k, v = make_inputs(meta, f.num_pages, 4, 2, 64, torch.float32, seed=1)
    ref = mk.tree_attention(q, k, v, meta, backend="reference")
    torch.testing.assert_close(mk.tree_attention(q, k, v, un, backend="reference"), ref)
    name, hook = kv_bytes_hook("auto", "cpu")
    if hook is None:
        pytest.skip(f"backend {name!r} registers no tree_attention_kv_bytes hook")
    shared, per_path = hook(q, k, v, meta, 0.125), hook(q, k, v, un, 0.125)
    unique = kv_elements_read(meta, per_group=False) * 2 * 2 * 64 * 4  # K+V, Hk=2, D=64, fp32
    assert unique <= shared < per_path


def test_example_runs():
    import os
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(root / "examples" / "multiverse_generate.py"), "--paths", "3",
                          "--path-len", "5", "--prefix", "10", "--concl-len", "3", "--check"],
                         capture_output=True, text=True, cwd=root, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "positions match parse()" in out.stdout and "1 fork / 1 join" in out.stdout
    err = float(re.search(r"dense Multiverse mask\)\| = (\S+)", out.stdout).group(1))
    assert err < 1e-4
    assert re.search(r"forest \(shared pages\)\s+[\d.]+\s+[\d,]+", out.stdout)


def test_logits_rows():
    model, _ = tiny_model(dtype=torch.float64, seed=4)
    drv = MultiverseDriver(TAGS, num_pages=64, page_size=4)
    b = drv.start(prompt(TAGS, 0, V, paths=2))
    full, part = [], []
    for rows, out in ((None, full), (b.last_rows, part)):
        cache = ForestKVCache.for_model(model, 64, 4)
        with torch.no_grad():
            out.append(forest_forward(model, b.input_ids, b.position_ids, b.meta, cache, b.token_node,
                                      b.token_pos, backend="reference", logits_rows=rows))
    assert part[0].shape == (1, V + 10)
    torch.testing.assert_close(part[0], full[0][b.last_rows])
