"""How an edit and its scoring noise the subject (Fact Forcing; Tracing Reversal's o_noise).

Two conventions, both built on ``tracekit.tracing.noise.add_subject_noise``:

- ``"paper-code"`` (default), as google/belief-localization's ``experiments/evaluate.py``:
  Gaussian noise times the rule's scale, drawn afresh for EVERY forward pass from a
  ``numpy.random.RandomState(1)`` stream that starts anew for each edit, each scoring pass
  and each essence text. While editing, every row of a batch is noised at the edit prompt's
  own subject positions (context-template rows included, where those positions hold other
  tokens of the template); while scoring, each prompt at its own subject span, the draw for
  row i taken as its first tokens (the draw is as long as the longest subject in the batch).
- ``"tracekit"``: one seeded draw, reused by every pass and row, added at each row's own
  subject span and aligned to the subject's end (a subject that tokenises into fewer pieces
  keeps the noise of its last pieces).

Either way the scale is recorded (``as_dict``) with every edit that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from tracekit.errors import check
from tracekit.tracing.noise import NoiseRule, NoiseScale, NumpyStream, noise_scale_info, scaled_noise

CONVENTIONS = ("paper-code", "tracekit")
PAPER_SEED = 1  # RandomState(1) in the paper's code


def check_convention(convention: str) -> str:
    check(convention in CONVENTIONS, f"unknown convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    return convention


@dataclass(frozen=True, eq=False)
class SubjectNoise:
    """The subject noise of one fact (see the module doc for the two conventions)."""

    convention: str
    scale: NoiseScale
    prompt_span: tuple[int, int]  # the subject's span in the edit prompt
    seed: int = 0  # tracekit: torch seed of the draw; paper-code: the stream's seed is PAPER_SEED + seed
    draw: torch.Tensor | None = field(default=None, repr=False)  # tracekit: the scaled draw [n, d]

    @property
    def fresh_per_pass(self) -> bool:
        return self.convention == "paper-code"

    def source(self, d_model: int) -> NumpyStream | None:
        """A new stream for one edit or one scoring pass (paper-code), or None."""
        return NumpyStream(self.scale.scale, d_model, PAPER_SEED + self.seed) if self.fresh_per_pass else None

    def edit_plan(self, source, spans: Sequence[tuple[int, int]]):
        """(spans, draws, alignment) for one forward pass of an editor over rows with ``spans``."""
        if not self.fresh_per_pass:
            return list(spans), self.draw[None], "end"
        begin, end = self.prompt_span
        return [self.prompt_span] * len(spans), source.draw(len(spans), end - begin), "start"

    def eval_plan(self, source, spans: Sequence[tuple[int, int] | None]):
        """(spans, draws, alignment) for one scoring pass (None: a prompt without the subject)."""
        if not self.fresh_per_pass:
            return list(spans), self.draw[None], "end"
        longest = max([e - b for b, e in (s for s in spans if s is not None)], default=0)
        return list(spans), source.draw(len(spans), longest), "start"

    def as_dict(self) -> dict:
        return {"noise_convention": self.convention, **self.scale.as_dict(),
                **({"noise_seed": self.seed} if self.convention == "tracekit" else
                   {"noise_stream": f"numpy RandomState({PAPER_SEED + self.seed}), fresh per pass"})}


def make_subject_noise(model, prompt: str, subject: str, noise="s3", seed: int = 0, convention: str = "paper-code",
                       also: Sequence[str] = ()) -> SubjectNoise:
    """The subject noise of ``prompt`` under ``convention``. ``also``: other prompts that will be
    scored under the noise (tracekit's single draw must cover their subject's tokenisation)."""
    check_convention(convention)
    rule = NoiseRule.parse(noise)
    span = model.subject_span(prompt, subject)
    scale = noise_scale_info(model, rule)
    if convention == "paper-code":
        check(rule.kind == "gaussian", f"the paper's code draws Gaussian noise; noise {noise!r} needs convention='tracekit'")
        return SubjectNoise(convention, scale, span, seed)
    longest = max([span[1] - span[0], len(model.target_ids(" " + subject.strip())), len(model.target_ids(subject))]
                  + [b - a for a, b in (model.subject_span(p, subject) for p in also)])
    return SubjectNoise(convention, scale, span, seed, scaled_noise(model, 1, longest, rule, seed)[0])


def as_subject_noise(model, request) -> SubjectNoise | None:
    """A request's noise as a SubjectNoise (a bare tensor [n, d] is a tracekit-convention draw)."""
    noise = request.noise
    if noise is None or isinstance(noise, SubjectNoise):
        return noise
    check(isinstance(noise, torch.Tensor) and noise.dim() == 2 and noise.shape[1] == model.d_model,
          f"subject noise must be a SubjectNoise or a tensor [n_subject_tokens, {model.d_model}]")
    span = model.subject_span(request.text, request.subject)
    scale = NoiseScale("given", float("nan"), None, "given draw")
    return SubjectNoise("tracekit", scale, span, 0, noise.float())
