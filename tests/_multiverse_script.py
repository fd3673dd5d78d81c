"""A scripted Multiverse 'model' policy for driver tests: it decides every branch's next token.

Fresh paths (and, with ``concl_nest``, conclusions) write some text and may open a nested block (up to
``nest`` levels); resumed branches (in a conclusion node after a join) write text, close the conclusion
and block, and end their path. The root
stops after its conclusion. Choices depend on (seed, branch id), so a run is reproducible.
"""

from __future__ import annotations

import random

from multiverse_kernels.multiverse import MultiverseDriver, MultiverseTags

STOP = -1


def open_block(tags: MultiverseTags, rng: random.Random, vocab: int, paths: int) -> list[int]:
    out = [tags.parallel_start, tags.goal_start, rng.randrange(vocab)]
    for _ in range(paths):
        out += [tags.outline_start, rng.randrange(vocab), tags.outline_end]
    return out + [tags.goal_end]


class ScriptPolicy:
    def __init__(self, tags: MultiverseTags, seed: int, vocab: int, nest: int = 1, max_paths: int = 3,
                 max_text: int = 4, nest_prob: float = 0.6, chunk: int = 1, concl_nest: bool = False) -> None:
        """``chunk`` > 1: scripted (known) tokens go in extend steps of up to ``chunk`` tokens.
        ``concl_nest``: conclusions may open a nested block too."""
        self.t, self.seed, self.vocab, self.nest = tags, seed, vocab, nest
        self.max_paths, self.max_text, self.nest_prob = max_paths, max_text, nest_prob
        self.chunk = chunk
        self.concl_nest = concl_nest
        self.concl_nested: dict[int, int] = {}
        self.state: dict[int, tuple[int, list[int]]] = {}

    def _rng(self, bid: int, node: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + bid * 1009 + node)

    def _text(self, rng: random.Random, lo: int = 0) -> list[int]:
        return [rng.randrange(self.vocab) for _ in range(rng.randint(lo, self.max_text))]

    def next_tokens(self, batch, proposed: list[int] | None = None) -> list | None:
        """One token per group of ``batch`` (``proposed[g]`` where the script leaves a free choice);
        None once the root is done."""
        out = []
        for g, info in enumerate(batch.branches):
            seen = info.branch in self.state
            node, queue = self.state.get(info.branch, (-1, []))
            if node != info.node:
                rng = self._rng(info.branch, info.node)
                if not seen and info.kind == "path":  # a fresh path
                    queue = self._text(rng, 1)
                    if info.depth < self.nest and rng.random() < self.nest_prob:
                        queue += open_block(self.t, rng, self.vocab, rng.randint(1, self.max_paths))
                    else:
                        queue += [self.t.path_end]
                elif seen:  # resumed in a conclusion after a join
                    close = [self.t.conclusion_end, self.t.parallel_end]
                    final = [self.t.path_end] if info.kind == "path" else [STOP]
                    opened = self.concl_nested.get(info.branch, 0)
                    if opened:  # the join of a block opened inside a conclusion: close both
                        self.concl_nested[info.branch] = opened - 1
                        queue = self._text(rng) + close + self._text(rng) + close + self._text(rng) + final
                    elif (self.concl_nest and info.depth < self.nest and rng.random() < self.nest_prob):
                        self.concl_nested[info.branch] = 1  # open a nested block in this conclusion
                        queue = self._text(rng) + open_block(self.t, rng, self.vocab,
                                                             rng.randint(1, self.max_paths))
                    else:
                        queue = self._text(rng) + close + self._text(rng) + final
                else:  # the root after its prompt: free text until the caller stops
                    queue = []
                self.state[info.branch] = (info.node, queue)
            if queue and self.chunk > 1 and queue[0] != STOP:
                tok = []
                while queue and len(tok) < self.chunk and queue[0] != STOP:
                    tok.append(queue.pop(0))
                    if tok[-1] in (self.t.goal_end, self.t.path_end):
                        break
                out.append(tok)
                continue
            if queue:
                tok = queue.pop(0)
            else:
                tok = proposed[g] if proposed is not None else self._rng(info.branch, 7).randrange(self.vocab)
            if tok == STOP:
                return None
            out.append(tok)
        return out


def prompt(tags: MultiverseTags, seed: int, vocab: int, paths: int = 3, text: int = 5) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(text)] + open_block(tags, rng, vocab, paths)


def run(driver: MultiverseDriver, policy: ScriptPolicy, prompt_ids: list[int], forward=None,
        max_steps: int = 400):
    """Drive a generation. ``forward(batch) -> proposed tokens or None`` is called on every batch (a
    model step); returns the list of batches."""
    batches = []
    b = driver.start(prompt_ids)
    for _ in range(max_steps):
        batches.append(b)
        proposed = forward(b) if forward is not None else None
        nxt = policy.next_tokens(b, proposed)
        if nxt is None:
            return batches
        b = driver.step(nxt)
        if b is None:
            return batches
    raise AssertionError("generation did not finish")
