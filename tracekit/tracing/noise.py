"""Noise rules for corrupting subject embeddings ("s3", a float, "u<scale>").

The "s3" rule (ROME): 3 x the standard deviation of the model's token embeddings,
measured over the tokens of a set of subjects, once per model (cached on the Model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tracekit.adapters import Site
from tracekit.errors import TracekitError

# Subjects used for the "s3" scale when the caller gives none (common, varied entities).
DEFAULT_SUBJECTS = (
    "The Eiffel Tower", "Danielle Darrieux", "Michael Jordan", "Barack Obama", "Toko Yasuda",
    "the Space Needle", "Apple", "Microsoft", "Albert Einstein", "the Colosseum", "Steve Jobs",
    "Germany", "Tokyo", "the Amazon river", "Mount Everest", "Pablo Picasso",
)


@dataclass(frozen=True)
class NoiseRule:
    kind: str  # "gaussian" or "uniform"
    multiplier: float  # times the embedding std ("s3") or an absolute scale
    relative: bool  # True: scale = multiplier x embedding std

    @classmethod
    def parse(cls, rule: str | float | "NoiseRule") -> "NoiseRule":
        if isinstance(rule, NoiseRule):
            return rule
        if isinstance(rule, (int, float)) and not isinstance(rule, bool):
            return cls("gaussian", _positive(float(rule), rule), relative=False)
        text = str(rule).strip().lower()
        try:
            if text.startswith("s"):
                return cls("gaussian", _positive(float(text[1:]), rule), relative=True)
            if text.startswith("u"):
                return cls("uniform", _positive(float(text[1:]), rule), relative=False)
            return cls("gaussian", _positive(float(text), rule), relative=False)
        except ValueError:
            raise TracekitError(f"unknown noise rule {rule!r}; use 's3' (3 x embedding std), a float, or 'u<scale>'") from None


def _positive(value: float, rule) -> float:
    if not value > 0:
        raise TracekitError(f"noise rule {rule!r} must give a positive scale")
    return value


def embedding_std(model, subjects: Sequence[str] = DEFAULT_SUBJECTS) -> float:
    """Std of token-embedding entries over the subjects' tokens; cached on the model."""
    cache = model.__dict__.setdefault("_embedding_std", {})
    key = tuple(subjects)
    if key not in cache:
        ids = sorted({i for s in subjects for i in model.target_ids(" " + s.strip())})
        batch = torch.tensor([ids])
        embeds = model.run(batch, capture=[Site("embed")]).captured[Site("embed")]
        cache[key] = float(embeds.float().std())
    return cache[key]


def noise_scale(model, rule: str | float | NoiseRule, subjects: Sequence[str] = DEFAULT_SUBJECTS) -> float:
    rule = NoiseRule.parse(rule)
    return rule.multiplier * embedding_std(model, subjects) if rule.relative else rule.multiplier


def draw_noise(samples: int, n_tokens: int, d_model: int, seed: int, rule: str | float | NoiseRule = "s3") -> torch.Tensor:
    """Unscaled draws [samples, n_tokens, d_model], reproducible from ``seed`` on any device."""
    rule = NoiseRule.parse(rule)
    gen = torch.Generator().manual_seed(int(seed))
    shape = (samples, n_tokens, d_model)
    if rule.kind == "uniform":
        return torch.rand(shape, generator=gen) * 2 - 1
    return torch.randn(shape, generator=gen)


def scaled_noise(model, samples: int, n_tokens: int, rule: str | float | NoiseRule = "s3", seed: int = 0,
                 draws: torch.Tensor | None = None) -> torch.Tensor:
    """Noise ready to add to ``n_tokens`` subject embeddings: [samples, n_tokens, d_model].

    ``draws`` (unscaled, e.g. from another tool) replace the seeded draws; either way
    they are multiplied by the rule's scale.
    """
    rule = NoiseRule.parse(rule)
    if draws is None:
        if not (isinstance(samples, int) and samples >= 1):
            raise TracekitError(f"samples must be an integer >= 1, got {samples!r}")
        draws = draw_noise(samples, n_tokens, model.d_model, seed, rule)
    else:
        draws = torch.as_tensor(draws)
        want = f"(samples, {n_tokens} subject tokens, {model.d_model})"
        if draws.ndim != 3 or tuple(draws.shape[1:]) != (n_tokens, model.d_model) or draws.shape[0] < 1:
            raise TracekitError(f"noise_draws has shape {tuple(draws.shape)}; expected {want}")
    return draws.float() * noise_scale(model, rule)


def subject_noise_hook(noise: torch.Tensor, start: int | torch.Tensor):
    """A hook for ``Site("embed")`` adding ``noise`` [rows or 1, n, d] at positions start..start+n-1.

    ``start`` is one int for every row or a tensor [rows] of per-row starts (prompts
    whose subject sits at different positions). Rows of ``noise`` match the batch's rows
    one to one; a single row is broadcast. Pure: returns a new tensor.
    """
    n = noise.shape[-2]

    def add_noise(hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        delta = noise.to(device=hidden.device, dtype=hidden.dtype).expand(rows, -1, -1)
        if isinstance(start, int):
            out = hidden.clone()
            out[:, start:start + n] = out[:, start:start + n] + delta
            return out
        cols = start.to(hidden.device)[:, None] + torch.arange(n, device=hidden.device)
        bump = torch.zeros_like(hidden)
        bump[torch.arange(rows, device=hidden.device)[:, None], cols] = delta
        return hidden + bump

    return add_noise
