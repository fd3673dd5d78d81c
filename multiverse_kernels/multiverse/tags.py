"""Multiverse tag tokens: ``<Parallel> <Goal> <Outline> <Path> <Conclusion>`` and their closers."""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Any

__all__ = ["MultiverseTags", "TAG_STRINGS"]

# field name -> tag string, in the order of the dataclass fields.
TAG_STRINGS: dict[str, str] = {
    "parallel_start": "<Parallel>",
    "parallel_end": "</Parallel>",
    "goal_start": "<Goal>",
    "goal_end": "</Goal>",
    "outline_start": "<Outline>",
    "outline_end": "</Outline>",
    "path_start": "<Path>",
    "path_end": "</Path>",
    "conclusion_start": "<Conclusion>",
    "conclusion_end": "</Conclusion>",
}


@dataclass(frozen=True)
class MultiverseTags:
    """Token ids of the ten Multiverse tags. All ids must be distinct non-negative ints."""

    parallel_start: int
    parallel_end: int
    goal_start: int
    goal_end: int
    outline_start: int
    outline_end: int
    path_start: int
    path_end: int
    conclusion_start: int
    conclusion_end: int

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{f.name}: expected a non-negative int token id, got {v!r}")
            if v in seen:
                raise ValueError(f"{f.name}: token id {v} is also used by {seen[v]}")
            seen[v] = f.name

    def ids(self) -> tuple[int, ...]:
        """The ten ids in field order."""
        return astuple(self)

    def name_of(self, token_id: int) -> str | None:
        """The tag string of ``token_id`` (e.g. ``"<Path>"``), or None if it is not a tag."""
        for f in fields(self):
            if getattr(self, f.name) == token_id:
                return TAG_STRINGS[f.name]
        return None

    @classmethod
    def from_ids(cls, ids: dict[str, int]) -> MultiverseTags:
        """From a mapping tag string (``"<Path>"``) -> id."""
        missing = [s for s in TAG_STRINGS.values() if s not in ids]
        if missing:
            raise ValueError(f"ids: missing tags {missing}")
        return cls(**{f: int(ids[s]) for f, s in TAG_STRINGS.items()})

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> MultiverseTags:
        """Look the ten tag strings up in a tokenizer.

        Works with a ``transformers`` tokenizer (``convert_tokens_to_ids``) or a ``tokenizers``
        ``Tokenizer`` (``token_to_id``). Each tag must be a single token of the vocabulary (add them with
        ``tokenizer.add_special_tokens`` first); raises ValueError naming the first tag that is not.
        """
        unk = getattr(tokenizer, "unk_token_id", None)
        ids: dict[str, int] = {}
        for name, s in TAG_STRINGS.items():
            if hasattr(tokenizer, "convert_tokens_to_ids"):
                tid = tokenizer.convert_tokens_to_ids(s)
            elif hasattr(tokenizer, "token_to_id"):
                tid = tokenizer.token_to_id(s)
            else:
                raise ValueError(
                    "tokenizer: expected convert_tokens_to_ids (transformers) or token_to_id (tokenizers)")
            if tid is None or (isinstance(tid, int) and tid < 0) or (unk is not None and tid == unk):
                raise ValueError(
                    f"tokenizer: tag {s} ({name}) is not a single token of the vocabulary; add the "
                    f"Multiverse tags as special tokens first")
            ids[name] = int(tid)
        return cls(**ids)
