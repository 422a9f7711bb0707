"""Subject noise: the noise rules, ROME's s3 scale, and the one primitive that adds noise to
subject token embeddings (tracing, Fact Forcing edits and their scoring all use it).

Rules: "s3" (3 x the embedding std, ROME), "s<k>" (k x the std), a float (absolute
Gaussian scale), "u<scale>" (uniform in [-scale, scale]). Scales must be finite and > 0.

The s3 std is computed as ROME's ``collect_embedding_std``: the std of the embedding rows
of every token of every known_1000 subject, each subject tokenised on its own (no leading
space, no special tokens; repeats counted). known_1000.json is found like every dataset (``tracekit.data.locate``: $TRACEKIT_DATA, ../shared/data, the download cache);
without it, the 16 ``FALLBACK_SUBJECTS`` are used, with the same rule (a warning says so and
``noise_scale_info`` records which). The value is memoised per model.

Alignment: a subject can tokenise into more pieces in one prompt than in another (at a
prompt's start, " Kyoto" may become "K|y|oto"). ``subject_noise_bump`` then aligns a draw to
the END of each row's subject span (tracekit) or to its START (the paper's evaluation code).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from tracekit.adapters import Site
from tracekit.errors import TracekitError, check
from tracekit.memo import model_memo

# Used for "s3" only when known_1000.json cannot be found (common, varied entities).
FALLBACK_SUBJECTS = (
    "The Eiffel Tower", "Danielle Darrieux", "Michael Jordan", "Barack Obama", "Toko Yasuda",
    "the Space Needle", "Apple", "Microsoft", "Albert Einstein", "the Colosseum", "Steve Jobs",
    "Germany", "Tokyo", "the Amazon river", "Mount Everest", "Pablo Picasso",
)
DEFAULT_SUBJECTS = FALLBACK_SUBJECTS  # former name


@dataclass(frozen=True)
class NoiseRule:
    kind: str  # "gaussian" or "uniform"
    multiplier: float  # times the embedding std ("s3") or an absolute scale
    relative: bool  # True: scale = multiplier x embedding std

    @classmethod
    def parse(cls, rule: "str | float | NoiseRule") -> "NoiseRule":
        if isinstance(rule, NoiseRule):
            return rule
        if isinstance(rule, (int, float)) and not isinstance(rule, bool):
            return cls("gaussian", _positive(float(rule), rule), relative=False)
        text = str(rule).strip().lower()
        kind, relative, number = ("gaussian", True, text[1:]) if text.startswith("s") else \
            ("uniform", False, text[1:]) if text.startswith("u") else ("gaussian", False, text)
        try:
            value = float(number)
        except ValueError:
            raise TracekitError(f"unknown noise rule {rule!r}; use 's3' (3 x embedding std), a float, or 'u<scale>'") from None
        return cls(kind, _positive(value, rule), relative=relative)

    def __str__(self) -> str:
        if self.relative:
            return f"s{self.multiplier:g}"
        return f"u{self.multiplier:g}" if self.kind == "uniform" else f"{self.multiplier:g}"


def _positive(value: float, rule) -> float:
    if not (math.isfinite(value) and value > 0):
        raise TracekitError(f"noise rule {rule!r} must give a finite, positive scale")
    return value


# ---- the s3 scale ----------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseScale:
    """A rule's scale for one model, and where its embedding std came from."""

    rule: str
    scale: float
    embedding_std: float | None  # None for an absolute rule
    subjects: str  # "known_1000 (<path>, 1209 subjects)", "fallback (16 built-in subjects)", "given (n subjects)"

    def as_dict(self) -> dict:
        return {"noise_rule": self.rule, "noise_scale": self.scale, "noise_embedding_std": self.embedding_std,
                "noise_std_subjects": self.subjects}


_KNOWN_SUBJECTS: dict[tuple[str, int], tuple[str, ...]] = {}  # known_1000 subjects per (path, mtime)


def noise_subjects(subjects: Sequence[str] | None = None) -> tuple[tuple[str, ...], str]:
    """The subjects behind the s3 std and a description of where they came from."""
    if subjects is not None:
        subjects = tuple(subjects)
        check(len(subjects) > 0, "the s3 noise scale needs at least one subject")
        return subjects, f"given ({len(subjects)} subjects)"
    from tracekit.data.locate import find_data_file

    try:
        path = find_data_file("known_1000")
    except TracekitError:
        return FALLBACK_SUBJECTS, f"fallback ({len(FALLBACK_SUBJECTS)} built-in subjects; known_1000.json not found)"
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _KNOWN_SUBJECTS:
        records = json.loads(path.read_text(encoding="utf-8"))
        check(isinstance(records, list) and all(isinstance(r, dict) and "subject" in r for r in records),
              f"{path} is not a known_1000 file (a list of records with a 'subject')")
        _KNOWN_SUBJECTS[key] = tuple(r["subject"] for r in records)
    found = _KNOWN_SUBJECTS[key]
    return found, f"known_1000 ({path}, {len(found)} subjects)"


def subject_token_ids(tokenizer, subjects: Sequence[str]) -> list[int]:
    """Every token of every subject, each encoded on its own as ROME encodes it (repeats kept).

    Special tokens a tokenizer adds (a BOS, tracekit's document-start token) are not subject
    tokens and are left out; GPT-2's and GPT-J's tokenizers add none, as in ROME."""
    return [i for s in subjects for i in tokenizer(s, add_special_tokens=False)["input_ids"]]


def embedding_std(model, subjects: Sequence[str] | None = None) -> float:
    """Std of the token-embedding entries over the subjects' tokens (ROME's collect_embedding_std)."""
    return _std_and_source(model, subjects)[0]


def _std_and_source(model, subjects: Sequence[str] | None) -> tuple[float, str]:
    chosen, source = noise_subjects(subjects)
    memo = model_memo(model, "embedding_std")
    key = (source, chosen if subjects is not None else None)
    if key not in memo:
        if source.startswith("fallback"):
            warnings.warn(f"s3 noise: {source}; the std differs from ROME's (set TRACEKIT_DATA to the folder "
                          "holding known_1000.json)", stacklevel=3)
        ids = torch.tensor(subject_token_ids(model.tokenizer, chosen), device=model.device)
        embed = model.adapter.module(model.hf, Site("embed"))
        with torch.no_grad():
            rows = embed(ids)
        memo[key] = float(rows.double().std())
    return memo[key], source


def noise_scale_info(model, rule: "str | float | NoiseRule", subjects: Sequence[str] | None = None) -> NoiseScale:
    rule = NoiseRule.parse(rule)
    if not rule.relative:
        return NoiseScale(str(rule), rule.multiplier, None, "none (absolute scale)")
    std, source = _std_and_source(model, subjects)
    return NoiseScale(str(rule), rule.multiplier * std, std, source)


def noise_scale(model, rule: "str | float | NoiseRule", subjects: Sequence[str] | None = None) -> float:
    return noise_scale_info(model, rule, subjects).scale


# ---- draws -----------------------------------------------------------------------------------
def draw_noise(samples: int, n_tokens: int, d_model: int, seed: int, rule: "str | float | NoiseRule" = "s3") -> torch.Tensor:
    """Unscaled draws [samples, n_tokens, d_model], reproducible from ``seed`` on any device."""
    rule = NoiseRule.parse(rule)
    gen = torch.Generator().manual_seed(int(seed))
    shape = (samples, n_tokens, d_model)
    if rule.kind == "uniform":
        return torch.rand(shape, generator=gen) * 2 - 1
    return torch.randn(shape, generator=gen)


def scaled_noise(model, samples: int, n_tokens: int, rule: "str | float | NoiseRule" = "s3", seed: int = 0,
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


class NumpyStream:
    """The paper code's noise source: ``numpy.random.RandomState(seed).randn`` called once per
    forward pass, shaped [rows, n_tokens, d_model], times ``scale``."""

    def __init__(self, scale: float, d_model: int, seed: int = 1):
        self.scale, self.d_model = float(scale), int(d_model)
        self.rng = np.random.RandomState(seed)

    def draw(self, rows: int, n_tokens: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.randn(rows, n_tokens, self.d_model)) * self.scale

    def state(self):
        return self.rng.get_state()

    def restore(self, state) -> None:
        self.rng.set_state(state)


# ---- the primitive ---------------------------------------------------------------------------
Span = tuple[int, int]


def subject_noise_bump(shape: Sequence[int], spans: Sequence[Span | None], draws: torch.Tensor, align: str = "end",
                       *, device=None, dtype=torch.float32) -> torch.Tensor:
    """A [rows, width, d] tensor holding each row's subject noise and zeros elsewhere.

    Row i's subject occupies positions spans[i] = (b, e) (None: no noise in that row). Its
    noise is draws[i] (or draws[0] for every row when ``draws`` has one row), a [n, d] block
    with n >= e - b: with ``align="end"`` the last e - b rows of the block are used (a subject
    tokenised into fewer pieces keeps the noise of its final pieces), with ``"start"`` the first.
    """
    rows, width, d = (int(x) for x in shape)
    check(align in ("end", "start"), f"noise alignment must be 'end' or 'start', got {align!r}")
    check(len(spans) == rows, f"{len(spans)} subject spans for {rows} rows")
    check(draws.ndim == 3 and draws.shape[-1] == d and draws.shape[0] in (1, rows),
          f"noise draws of shape {tuple(draws.shape)} do not fit {rows} rows of width {d}")
    bump = torch.zeros(rows, width, d, device=device, dtype=dtype)
    kept = [(i, s[0], s[1]) for i, s in enumerate(spans) if s is not None and s[1] > s[0]]
    if not kept:
        return bump
    row, begin, end = torch.tensor(kept).T
    k, n = end - begin, draws.shape[1]
    check(bool((begin >= 0).all()) and bool((end <= width).all()),
          f"a subject span lies outside a row of {width} tokens: {spans}")
    check(int(k.max()) <= n, f"a subject of {int(k.max())} tokens, but the noise covers only {n}; "
                             "draw it for the longest tokenisation")
    # one (row, position, source row of the draw) triple per noised token
    first = (torch.cumsum(k, 0) - k).repeat_interleave(k)
    offset = torch.arange(int(k.sum())) - first  # j = 0..k-1 within each span
    rows_t = row.repeat_interleave(k)
    source = offset + (n - k).repeat_interleave(k) if align == "end" else offset
    draw_rows = rows_t if draws.shape[0] == rows else torch.zeros_like(rows_t)
    values = draws.to(device=bump.device, dtype=dtype)[draw_rows.to(bump.device), source.to(bump.device)]
    bump[rows_t.to(bump.device), (begin.repeat_interleave(k) + offset).to(bump.device)] = values
    return bump


def add_subject_noise(hidden: torch.Tensor, spans: Sequence[Span | None], draws: torch.Tensor,
                      align: str = "end") -> torch.Tensor:
    """``hidden`` [rows, width, d] plus each row's subject noise (``subject_noise_bump``). Pure."""
    bump = subject_noise_bump(hidden.shape, spans, draws, align, device=hidden.device, dtype=hidden.dtype)
    return hidden + bump


def spans_noise_hook(spans: Sequence[Span | None], draws: torch.Tensor, align: str = "end"):
    """A ``Site("embed")`` hook adding ``add_subject_noise`` to the token embeddings."""
    return lambda hidden: add_subject_noise(hidden, spans, draws, align)


def subject_noise_hook(noise: torch.Tensor, start: "int | torch.Tensor"):
    """A hook for ``Site("embed")`` adding ``noise`` [rows or 1, n, d] at positions start..start+n-1.

    ``start`` is one int for every row or a tensor [rows] of per-row starts. Rows of ``noise``
    match the batch's rows one to one; a single row is broadcast. Pure: returns a new tensor.
    """
    n = noise.shape[-2]
    noise = noise if noise.ndim == 3 else noise[None]

    def add_noise(hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        starts = [int(start)] * rows if isinstance(start, int) else [int(s) for s in start]
        return add_subject_noise(hidden, [(s, s + n) for s in starts], noise)

    return add_noise
