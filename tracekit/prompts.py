"""Tokenisation helpers shared by tracing, editing and metrics.

Batches are right-padded: a row's real tokens sit at positions 0..length-1, so its last
real position is ``length - 1`` and, under causal attention, padding never affects it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from tracekit.errors import SubjectWarning, TracekitError, check


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [batch, max_len], right-padded
    lengths: torch.Tensor  # [batch]

    @property
    def last(self) -> torch.Tensor:
        """Index of each row's last real token."""
        return self.lengths - 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt as the model sees it (with the tokenizer's special tokens)."""
    check(isinstance(text, str) and text.strip() != "", "empty prompt: give some text")
    return tokenizer(text)["input_ids"]


def tokenization_probe(tokenizer) -> bytes:
    """How a tokenizer encodes a fixed text, special tokens included: part of every cache key,
    since a prepended document-start token changes every result."""
    return str(token_ids(tokenizer, "The")).encode()


def pad(rows: Sequence[Sequence[int]], pad_id: int) -> Batch:
    check(len(rows) > 0, "no prompts given")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return Batch(ids, torch.tensor([len(r) for r in rows], dtype=torch.long))


def encode(tokenizer, prompts: Sequence[str], max_len: int | None = None) -> Batch:
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = [token_ids(tokenizer, p) for p in prompts]
    if max_len is not None:
        for p, r in zip(prompts, rows):
            check(len(r) <= max_len, f"prompt is {len(r)} tokens, longer than the model's context of {max_len}: {p[:60]!r}")
    return pad(rows, tokenizer.pad_token_id)


def subject_occurrences(prompt: str, subject: str) -> list[int]:
    """Character offsets of every appearance of ``subject`` in ``prompt`` (overlaps included)."""
    starts = []
    at = prompt.find(subject)
    while at != -1:
        starts.append(at)
        at = prompt.find(subject, at + 1)
    return starts


def inside_word(prompt: str, subject: str, char_start: int) -> str | None:
    """The longer word the subject at ``char_start`` is part of ("Parisian" for "Paris"), else None."""
    end = char_start + len(subject)
    glued_before = char_start > 0 and prompt[char_start - 1].isalnum() and subject[0].isalnum()
    glued_after = end < len(prompt) and prompt[end].isalnum() and subject[-1].isalnum()
    if not (glued_before or glued_after):
        return None
    start, stop = char_start, end
    while start > 0 and prompt[start - 1].isalnum():
        start -= 1
    while stop < len(prompt) and prompt[stop].isalnum():
        stop += 1
    return prompt[start:stop]


def warn_if_inside_word(prompt: str, subject: str, char_start: int, stacklevel: int = 3) -> None:
    word = inside_word(prompt, subject, char_start)
    if word is not None:
        warnings.warn(f"subject {subject!r} sits inside the longer word {word!r} in {prompt!r}: its span covers "
                      f"that word's tokens", SubjectWarning, stacklevel=stacklevel)


def subject_span(tokenizer, prompt: str, subject: str, occurrence: int | None = None) -> tuple[int, int]:
    """Token span [start, end) covering ``subject`` inside ``prompt``.

    Uses the tokenizer's character offsets, not decoding: a token that merges the
    subject with a neighbouring character (a leading space, a suffix) belongs to the span.
    ``occurrence`` picks which appearance of a repeated subject (0 = first, -1 = last).
    None (the default) takes the first appearance that is a whole word (else the first) and
    warns (``SubjectWarning``) where that guess may be wrong: the subject appears more than
    once, or only inside a longer word ("Paris" in "Parisian").
    """
    check(isinstance(prompt, str), f"the prompt must be a string, got a {type(prompt).__name__}")
    check(isinstance(subject, str) and subject.strip() != "", "empty subject")
    starts = subject_occurrences(prompt, subject)
    if not starts:
        tokens = tokenizer.convert_ids_to_tokens(token_ids(tokenizer, prompt))
        raise TracekitError(f"subject {subject!r} is not in the prompt {prompt!r} (tokens: {tokens})")
    if occurrence is None:
        whole = [at for at in starts if inside_word(prompt, subject, at) is None]
        char_start = (whole or starts)[0]
        if len(starts) > 1:
            warnings.warn(f"subject {subject!r} occurs {len(starts)} times in {prompt!r}; using occurrence "
                          f"{starts.index(char_start)} (pass occurrence= to choose)", SubjectWarning, stacklevel=3)
        warn_if_inside_word(prompt, subject, char_start)
    else:
        check(isinstance(occurrence, int) and not isinstance(occurrence, bool),
              f"occurrence must be an integer (0 = first, -1 = last), got {occurrence!r}")
        try:
            char_start = starts[occurrence]
        except IndexError:
            raise TracekitError(f"subject {subject!r} occurs {len(starts)} time(s); occurrence {occurrence} does not exist") from None
    char_end = char_start + len(subject)
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    inside = [
        i for i, (a, b) in enumerate(encoding["offset_mapping"])
        if b > a and a < char_end and b > char_start
    ]
    check(bool(inside), f"no token of the prompt covers subject {subject!r}")
    return inside[0], inside[-1] + 1


def target_ids(tokenizer, target: str) -> list[int]:
    """All tokens of a target continuation (keep its leading space: " Paris")."""
    check(isinstance(target, str) and target != "", "empty target")
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    check(len(ids) > 0, f"target {target!r} tokenises to nothing")
    return ids


def first_target_id(tokenizer, target: str) -> int:
    """The token whose probability the paper reports as p(target | prompt)."""
    return target_ids(tokenizer, target)[0]
