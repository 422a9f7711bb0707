"""What one trace computes: validated settings, window edges, the cells to restore.

A *cell* is one (token t, window centre l) restoration; a *row* is one cell under one
noise sample. Both engines and the naive loop read the same ``Prompt`` and ``Settings``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from tracekit.errors import TracekitError, check
from tracekit.tracing.noise import NoiseRule

KINDS = ("mlp", "attn", "resid")
TOKEN_CHOICES = ("all", "subject", "subject_last")
ENGINES = ("auto", "fast", "generic")


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored for window centre ``layer``: max(0, l - w//2) .. min(L, l - (-w//2)) - 1."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@dataclass(frozen=True)
class Settings:
    """Every knob of a trace; stored verbatim in the result's ``config``."""

    kind: str = "mlp"
    window: int = 10
    samples: int = 10
    noise: str = "s3"
    seed: int = 0
    tokens: str | tuple[int, ...] = "all"
    engine: str = "auto"

    @classmethod
    def make(cls, n_layers: int, *, kind="mlp", window=10, samples=10, noise="s3", seed=0, tokens="all",
             engine="auto", zeroing=False) -> "Settings":
        check(kind in KINDS, f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
        check(isinstance(window, int) and not isinstance(window, bool) and window >= 1,
              f"window must be an integer >= 1, got {window!r}")
        check(window <= n_layers, f"window {window} is larger than the model's {n_layers} layers; use 1..{n_layers}")
        if not zeroing:
            check(isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1,
                  f"samples must be an integer >= 1, got {samples!r}")
            NoiseRule.parse(noise)  # raises a one-line error for an unknown rule
        check(engine in ENGINES, f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if not isinstance(tokens, str):
            tokens = tuple(int(t) for t in tokens)
        else:
            check(tokens in TOKEN_CHOICES, f"unknown tokens {tokens!r}; use {', '.join(TOKEN_CHOICES)} or a list of indices")
        return cls(kind, window, samples, str(noise), int(seed), tokens, engine)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["tokens"] = list(self.tokens) if isinstance(self.tokens, tuple) else self.tokens
        return out


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt with its subject span and the answer token being traced."""

    text: str
    subject: str
    input_ids: torch.Tensor  # [1, T]
    tokens: list[str]
    span: tuple[int, int]  # subject tokens [start, end)
    answer_id: int
    answer: str

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def positions(self, tokens: str | Sequence[int]) -> list[int]:
        if tokens == "all":
            return list(range(self.length))
        if tokens == "subject":
            return list(range(*self.span))
        if tokens == "subject_last":
            return [self.span[1] - 1]
        out = [int(t) + self.length if int(t) < 0 else int(t) for t in tokens]
        for t, given in zip(out, tokens):
            check(0 <= t < self.length, f"token index {given} is outside the prompt's {self.length} tokens")
        check(len(out) > 0, "tokens: give at least one token index")
        return out


def prepare_prompt(model, prompt: str, subject: str, target: str | None, occurrence: int | None = None,
                   shapes: str | None = None) -> Prompt:
    """Tokenise, find the subject (``occurrence``: see ``prompts.subject_span``) and pick the
    answer (the model's own top token if no target)."""
    unanswered = tokenise_prompt(model, prompt, subject, target, occurrence)
    logits = None
    if target is None:
        ids = unanswered.input_ids
        logits = model.forward(ids, logits=torch.tensor([ids.shape[1] - 1]), shapes=shapes).logits[0]
    return unanswered.answered(model, logits)


@dataclass(frozen=True)
class Unanswered:
    """A checked, tokenised prompt whose answer may still need the clean run's top token."""

    text: str
    subject: str
    input_ids: torch.Tensor
    span: tuple[int, int]
    target: str | None
    target_id: int | None

    def answered(self, model, clean_logits: torch.Tensor | None) -> Prompt:
        """The ``Prompt``, its answer the target or else the top token of ``clean_logits`` [V]."""
        answer_id = self.target_id if self.target is not None else int(clean_logits.argmax())
        return Prompt(self.text, self.subject, self.input_ids, model.tokens(self.text), self.span, answer_id,
                      model.tokenizer.decode([answer_id]))


def tokenise_prompt(model, prompt: str, subject: str, target: str | None,
                    occurrence: int | None = None) -> Unanswered:
    """Every check of a prompt, subject and target that needs no forward pass."""
    check(isinstance(prompt, str) and prompt.strip() != "", "empty prompt: give some text")
    batch = model.encode([prompt])
    span = model.subject_span(prompt, subject, occurrence)
    target_id = None
    if target is not None:
        from tracekit.patching.metrics import target_tokens  # warns for a target off a token boundary

        target_id = target_tokens(model.tokenizer, prompt, target, stacklevel=5)[0]
    return Unanswered(prompt, subject, batch.input_ids, span, target, target_id)


def indistinguishable(p_clean: float, p_noise: float) -> bool:
    """p_clean == p_noise up to float32 rounding (the clean and corrupted runs may take different kernels)."""
    return abs(p_clean - p_noise) <= 1e-6 * max(abs(p_clean), abs(p_noise), 1e-30)


def tracing_effect(p_restore: torch.Tensor, p_clean: float, p_noise: float) -> torch.Tensor:
    """Fraction restored, max(0, (p_restore - p_noise) / |p_clean - p_noise|); zeros if p_clean == p_noise."""
    gap = abs(p_clean - p_noise)
    if indistinguishable(p_clean, p_noise):
        return torch.zeros_like(p_restore)
    return ((p_restore - p_noise) / gap).clamp(min=0)


def record_fields(record) -> tuple[str, str, str | None]:
    """(prompt, subject, target) from a dict, a (prompt, subject[, target]) tuple, a known_1000
    record (prompt, subject, attribute), a CounterFact record (requested_rewrite) or a
    ``FactRecord`` (traces o_true)."""
    if isinstance(record, (tuple, list)):
        check(len(record) in (2, 3), "a record tuple is (prompt, subject) or (prompt, subject, target)")
        return record[0], record[1], (record[2] if len(record) == 3 else None)
    if not isinstance(record, dict):
        if hasattr(record, "text") and hasattr(record, "subject"):  # tracekit FactRecord-like: trace o_true
            target = getattr(record, "target_true", None) or getattr(record, "o_true", None)
            return record.text, record.subject, target
        record = {k: getattr(record, k) for k in ("prompt", "subject", "target") if hasattr(record, k)}
    if "requested_rewrite" in record:
        rw = record["requested_rewrite"]
        target = rw.get("target_true", {}).get("str")
        return rw["prompt"].format(rw["subject"]), rw["subject"], (" " + target.strip()) if target else None
    if "prompt" not in record or "subject" not in record:
        raise TracekitError(f"record has no prompt/subject fields: {sorted(record)}")
    target = record.get("target", record.get("attribute"))
    if target is not None and not target.startswith(" "):
        target = " " + target
    prompt = record["prompt"].replace("{}", record["subject"], 1)  # a template or a filled-in prompt
    return prompt, record["subject"], target
