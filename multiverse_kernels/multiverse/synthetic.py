"""Random well-formed Multiverse sequences, for tests and benchmarks."""

from __future__ import annotations

import random

from .tags import MultiverseTags

__all__ = ["random_sequence"]


def random_sequence(seed: int, tags: MultiverseTags, vocab: int = 32, max_depth: int = 2,
                    max_paths: int = 3, max_text: int = 4, goal_prob: float = 0.8,
                    gap_prob: float = 0.3, conclusion_prob: float = 0.8) -> list[int]:
    """A random well-formed sequence: text (ids ``0 .. vocab - 1``) and ``<Parallel>`` blocks nested
    up to ``max_depth`` inside paths and conclusions; blocks with and without a goal, outlines, gaps
    between paths, empty and one-token text runs, blocks with and without a conclusion."""
    T = tags
    rng = random.Random(seed)

    def text(lo: int = 0) -> list[int]:
        return [rng.randrange(vocab) for _ in range(rng.randint(lo, max_text))]

    def content(depth: int) -> list[int]:
        out = text()
        for _ in range(rng.randint(0, 2)):
            if depth < max_depth and rng.random() < 0.5:
                out += block(depth + 1)
            out += text()
        return out

    def block(depth: int) -> list[int]:
        k = rng.randint(1, max_paths)
        out = [T.parallel_start] + text()
        if rng.random() < goal_prob:
            out += [T.goal_start] + text()
            for _ in range(k):
                out += [T.outline_start] + text(1) + [T.outline_end]
            out += [T.goal_end]
        for i in range(k):
            if i and rng.random() < gap_prob:
                out += text(1)
            out += [T.path_start] + content(depth) + [T.path_end]
        if rng.random() < conclusion_prob:
            out += [T.conclusion_start] + content(depth) + [T.conclusion_end]
        return out + [T.parallel_end]

    return content(0) + block(1) + content(0)
