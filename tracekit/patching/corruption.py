"""How the corrupted run differs from the clean one: another prompt of the same token length, a
token replacement, or Gaussian noise on a span of token embeddings (causal tracing's rule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracekit import prompts as P
from tracekit.adapters import Site
from tracekit.errors import check
from tracekit.tracing.noise import NoiseRule, scaled_noise, subject_noise_hook


@dataclass(frozen=True)
class Noise:
    """Gaussian (or uniform) noise on the subject's token embeddings, as ``trace`` adds it: ``samples``
    seeded draws (or ``draws`` [samples, subject tokens, d_model], unscaled) times the ``noise`` rule's
    scale ("s3": 3 x the embedding std). ``occurrence``: which appearance of a repeated subject."""

    subject: str
    noise: str | float = "s3"
    samples: int = 10
    seed: int = 0
    occurrence: int | None = None
    draws: torch.Tensor | None = None

    def describe(self) -> str:
        return f"noise {NoiseRule.parse(self.noise)} on {self.subject!r} ({self.samples} samples, seed {self.seed})"


@dataclass(frozen=True)
class Replace:
    """Replace the first occurrence of ``old`` in the clean prompt by ``new`` (same token count: a
    symmetric token replacement, e.g. Replace("Eiffel Tower", "Colosseum") where both are 2 tokens)."""

    old: str
    new: str

    def describe(self) -> str:
        return f"{self.old!r} -> {self.new!r}"


@dataclass
class Corrupted:
    """The corrupted run: token ids [S, T] (S noise samples, else 1), an embedding edit, a span."""

    ids: torch.Tensor
    edits: dict
    description: str
    span: tuple[int, int] | None = None  # the corrupted tokens, where known
    text: str | None = None


def corrupt_run(model, clean: str, clean_ids: list[int], corrupt, extra: list[int]) -> Corrupted:
    """``corrupt``: a prompt string, ``Replace`` or ``Noise``. ``extra``: tokens appended to both runs
    (a teacher-forced target's leading tokens)."""
    if isinstance(corrupt, Noise):
        span = model.subject_span(clean, corrupt.subject, corrupt.occurrence)
        draws = None if corrupt.draws is None else torch.as_tensor(corrupt.draws)
        samples = corrupt.samples if draws is None else int(draws.shape[0])
        noise = scaled_noise(model, samples, span[1] - span[0], corrupt.noise, corrupt.seed, draws=draws)
        ids = torch.tensor([clean_ids + extra]).expand(noise.shape[0], -1)
        return Corrupted(ids, {Site("embed"): subject_noise_hook(noise, span[0])}, corrupt.describe(), span)
    if isinstance(corrupt, Replace):
        check(corrupt.old in clean, f"{corrupt.old!r} is not in the clean prompt {clean!r}")
        text = clean.replace(corrupt.old, corrupt.new, 1)
        description = corrupt.describe()
    else:
        check(isinstance(corrupt, str) and corrupt.strip() != "",
              "corrupt: give a prompt (same token length), Replace(old, new) or Noise(subject)")
        text, description = corrupt, repr(corrupt)
    ids = P.token_ids(model.tokenizer, text)
    check(len(ids) == len(clean_ids), f"the corrupted prompt is {len(ids)} tokens and the clean one "
                                      f"{len(clean_ids)}: patching needs the same length ({text!r})")
    differ = [i for i, (a, b) in enumerate(zip(ids, clean_ids)) if a != b]
    span = (differ[0], differ[-1] + 1) if differ else None
    return Corrupted(torch.tensor([ids + extra]), {}, description, span, text)
