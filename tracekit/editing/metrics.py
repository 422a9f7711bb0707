"""Edit metrics for one edited point (method-notes, "Edit metrics").

The score formulas are pure functions over probabilities (tests feed hand-computed
numbers). ``evaluate_edit`` gathers the probabilities: every prompt of the point (edit
prompt, paraphrases, neighbourhood prompts) x every object, plus the essence texts, in ONE
batched pass before the edit and ONE after.

Scoring rule (``SCORING_RULE``): p(o | prompt) is the probability of the object's FIRST
token at the end of the prompt, as in the paper; the full object's mean per-token
log-prob (teacher forced) is reported beside it for multi-token objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from tracekit import prompts as P
from tracekit.editing.delta import Edit
from tracekit.editing.logprobs import Query, text_query, token_logprobs
from tracekit.editing.problems import EditSetup
from tracekit.errors import check

SCORING_RULE = ("p(o|prompt) = probability of the object's first token after the prompt (paper); "
                "full-object mean log-prob, teacher forced, reported alongside")
ESSENCE_PROMPT = "{} is a"
ESSENCE_CAP = 5.0  # a perplexity rise of 5 or more is maximally bad


# ---- pure formulas -----------------------------------------------------------------------
def rewrite_score(p_before: float, p_after: float, minimize: bool = False) -> float:
    """(p* - p) / (1 - p) when raising p(target); (p - p*) / p for Fact Erasure."""
    if minimize:
        return (p_before - p_after) / p_before if p_before > 0 else math.nan
    return (p_after - p_before) / (1 - p_before) if p_before < 1 else math.nan


def paraphrase_score(before: Sequence[float], after: Sequence[float], minimize: bool = False) -> float:
    """The rewrite formula on each paraphrase, averaged."""
    return _mean([rewrite_score(b, a, minimize) for b, a in zip(before, after, strict=True)])


def neighborhood_score(before: Sequence[float], after: Sequence[float]) -> float:
    """1 - |p*(o_true|s*) - p(o_true|s*)| / (0.5 + |p(o_true|s*) - 0.5|), averaged; 1 = untouched."""
    return _mean([1 - abs(a - b) / (0.5 + abs(b - 0.5)) for b, a in zip(before, after, strict=True)])


def overall_score(rewrite: float, paraphrase: float, neighborhood: float) -> float:
    """Mean of the three (of those that could be computed)."""
    return _mean([rewrite, paraphrase, neighborhood])


def essence_score(ppl_before: float, ppl_after: float) -> float:
    """1 - clip(ppl_after - ppl_before, 0, 5) / 5."""
    return 1 - min(max(ppl_after - ppl_before, 0.0), ESSENCE_CAP) / ESSENCE_CAP


def perplexity(logprobs: Sequence[float]) -> float:
    """exp of the mean negative log-prob over the given tokens (pooled)."""
    return math.exp(-float(np.mean(logprobs))) if len(logprobs) else math.nan


def success_rate(p_win: Sequence[float], p_lose: Sequence[float]) -> float:
    """Meng et al.: fraction of prompts where p*(winner) > p*(loser)."""
    return _mean([float(w > l) for w, l in zip(p_win, p_lose, strict=True)])


def magnitude(p_win: Sequence[float], p_lose: Sequence[float]) -> float:
    """Meng et al.: mean p*(winner) - p*(loser)."""
    return _mean([w - l for w, l in zip(p_win, p_lose, strict=True)])


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


@dataclass(frozen=True)
class KindProbs:
    """p(object | prompt) for one kind of prompt at one time, by object role:
    "target" (the edit's object), "true" (o_true), "counter" (the object competing with o_true)."""

    target: tuple[float, ...] = ()
    true: tuple[float, ...] | None = None
    counter: tuple[float, ...] | None = None


def compute_scores(before: Mapping[str, KindProbs], after: Mapping[str, KindProbs], *, minimize: bool,
                   toward_true: bool, ppl_before: float | None = None, ppl_after: float | None = None) -> dict[str, float]:
    """All scores of one point from probabilities. Kinds: "rewrite", "paraphrase", "neighborhood".

    Unscaled (Meng et al., after the edit): on the edit prompt and paraphrases the winner is
    o_true when the problem pushes toward it (amplification, forcing), else the counter object
    (o_false / o_noise); on neighbourhood prompts o_true should stay ahead of the counter.
    """
    empty = KindProbs()
    rw_b, rw_a = before.get("rewrite", empty), after.get("rewrite", empty)
    pa_b, pa_a = before.get("paraphrase", empty), after.get("paraphrase", empty)
    nb_b, nb_a = before.get("neighborhood", empty), after.get("neighborhood", empty)
    out = {
        "rewrite": rewrite_score(rw_b.target[0], rw_a.target[0], minimize) if rw_b.target else math.nan,
        "paraphrase": paraphrase_score(pa_b.target, pa_a.target, minimize),
        "neighborhood": neighborhood_score(nb_b.true, nb_a.true) if nb_b.true is not None else math.nan,
    }
    out["overall"] = overall_score(out["rewrite"], out["paraphrase"], out["neighborhood"])
    out["essence"] = essence_score(ppl_before, ppl_after) if ppl_before is not None and ppl_after is not None else math.nan
    for name, kind in (("efficacy", rw_a), ("paraphrase", pa_a)):
        if kind.true is None or kind.counter is None:
            out[f"{name}_success"] = out[f"{name}_magnitude"] = math.nan
            continue
        win, lose = (kind.true, kind.counter) if toward_true else (kind.counter, kind.true)
        out[f"{name}_success"], out[f"{name}_magnitude"] = success_rate(win, lose), magnitude(win, lose)
    if nb_a.true is None or nb_a.counter is None:
        out["neighborhood_success"] = out["neighborhood_magnitude"] = math.nan
    else:
        out["neighborhood_success"] = success_rate(nb_a.true, nb_a.counter)
        out["neighborhood_magnitude"] = magnitude(nb_a.true, nb_a.counter)
    return out


# ---- gathering the probabilities ---------------------------------------------------------------
@dataclass(frozen=True)
class MetricsConfig:
    essence: bool = True
    essence_samples: int = 5
    essence_top_k: int = 5
    essence_new_tokens: int = 30
    seed: int = 0

    def __post_init__(self):
        check(self.essence_samples >= 1 and self.essence_top_k >= 1 and self.essence_new_tokens >= 1,
              "essence_samples, essence_top_k and essence_new_tokens must be >= 1")


@dataclass(frozen=True)
class PromptRow:
    kind: str  # rewrite / paraphrase / neighborhood
    prompt: str
    role: str  # target / true / counter
    obj: str
    noised: bool
    p_before: float
    p_after: float
    logprob_before: float  # mean per-token log-prob of the whole object
    logprob_after: float


@dataclass
class EditScores:
    scores: dict[str, float]
    rows: list[PromptRow]
    essence_texts: list[str] = field(default_factory=list)
    ppl_before: float = math.nan
    ppl_after: float = math.nan
    scoring: str = SCORING_RULE
    notes: tuple[str, ...] = ()


def sample_essence_texts(model, subject: str, config: MetricsConfig = MetricsConfig()) -> list[str]:
    """Texts sampled from the model given "{subject} is a" (top-k, seeded), prompt included."""
    return [model.tokenizer.decode(r, skip_special_tokens=True) for r in sample_essence_tokens(model, subject, config)]


def sample_essence_tokens(model, subject: str, config: MetricsConfig = MetricsConfig()) -> list[tuple[int, ...]]:
    """Token rows of the essence texts (scored as sampled: no decode/re-encode round trip).

    Sampled through ``model.run`` (whole forward passes, no KV cache: a few dozen short
    passes), so every backend gives the same texts. Cached on the model object per
    (subject, settings): sample them before applying an edit."""
    key = (subject, config.essence_samples, config.essence_top_k, config.essence_new_tokens, config.seed)
    cache = model.__dict__.setdefault("_essence_texts", {})
    if key not in cache:
        prompt_ids = P.token_ids(model.tokenizer, ESSENCE_PROMPT.format(subject))
        rows = [list(prompt_ids) for _ in range(config.essence_samples)]
        gen = torch.Generator().manual_seed(config.seed)
        for _ in range(config.essence_new_tokens):
            batch = P.pad(rows, model.tokenizer.pad_token_id)
            logits = model.run(batch.input_ids, positions=batch.last).logits.float().cpu()
            top_logits, top_ids = logits.topk(config.essence_top_k, dim=-1)
            picks = torch.multinomial(torch.softmax(top_logits, dim=-1), 1, generator=gen)
            for row, token in zip(rows, top_ids.gather(1, picks)[:, 0].tolist()):
                row.append(token)
        cache[key] = tuple(tuple(r) for r in rows)
    return list(cache[key])


def _queries(model, setup: EditSetup, essence_rows):
    """(kind, role, object, noised) labels and their queries, for one batched pass."""
    req = setup.request
    prompts = [("rewrite", req.text)] + [("paraphrase", p) for p in setup.paraphrases]
    prompts += [("neighborhood", p) for p in setup.neighbours]
    own = {"target": setup.target, "true": setup.o_true, "counter": setup.counter}
    neighbour = {"true": setup.neighbour_true or setup.o_true, "counter": setup.counter}
    labels, queries = [], []
    for kind, prompt in prompts:
        for role, obj in (neighbour if kind == "neighborhood" else own).items():
            if obj is None:
                continue
            noised = req.noise is not None and req.subject in prompt
            queries.append(text_query(model, prompt, obj, req.subject, req.noise if noised else None))
            labels.append((kind, prompt, role, obj, noised))
    # perplexity over every token of each text after its first
    essence = [Query(ids[:1], ids[1:]) for ids in essence_rows if len(ids) > 1]
    return labels, queries, essence


def evaluate_edit(model, setup: EditSetup, edit: Edit, config: MetricsConfig = MetricsConfig()) -> EditScores:
    """Score ``edit`` (not applied on entry; left as found) on the point described by ``setup``."""
    check(not edit.applied, "evaluate_edit needs the edit un-applied: the 'before' pass runs the original model")
    essence_rows = sample_essence_tokens(model, setup.request.subject, config) if config.essence else []
    labels, queries, essence = _queries(model, setup, essence_rows)
    before = _before_pass(model, queries + essence)
    with edit:
        after = token_logprobs(model, queries + essence)
    rows = [PromptRow(*label, p_before=float(b[0].exp()), p_after=float(a[0].exp()),
                      logprob_before=float(b.mean()), logprob_after=float(a.mean()))
            for label, b, a in zip(labels, before, after)]
    n = len(queries)
    ppl_b = perplexity(torch.cat(before[n:]).tolist()) if essence else None
    ppl_a = perplexity(torch.cat(after[n:]).tolist()) if essence else None
    scores = compute_scores(_by_kind(rows, "p_before"), _by_kind(rows, "p_after"), minimize=setup.request.minimize,
                            toward_true=setup.toward_true, ppl_before=ppl_b, ppl_after=ppl_a)
    texts = [model.tokenizer.decode(r, skip_special_tokens=True) for r in essence_rows]
    notes = setup.notes
    if setup.request.noise is not None:
        notes += ("neighbourhood prompts (other subjects) and essence texts are scored without noise",)
    return EditScores(scores, rows, texts, ppl_b if ppl_b is not None else math.nan,
                      ppl_a if ppl_a is not None else math.nan, notes=notes)


_BASELINE = "_baseline_logprobs"  # attribute of a model inside ``baseline_cached``
_BASELINE_ENTRIES = 64


@contextlib.contextmanager
def baseline_cached(model):
    """Reuse each point's "before" pass inside this block (a sweep edits one point at up to
    dozens of layers and methods, all scored against the same unedited model).

    The caller promises that the weights are the original ones whenever an edit is evaluated
    in the block, as a sweep that undoes each edit guarantees.
    """
    outer = model.__dict__.get(_BASELINE)
    model.__dict__[_BASELINE] = {} if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            model.__dict__.pop(_BASELINE, None)


def _before_pass(model, queries: Sequence[Query]) -> list[torch.Tensor]:
    cache = model.__dict__.get(_BASELINE)
    if cache is None:
        return token_logprobs(model, queries)
    key = tuple((q.prefix, q.continuation, q.noise_start, _tensor_digest(q.noise)) for q in queries)
    if key not in cache:
        if len(cache) >= _BASELINE_ENTRIES:
            cache.pop(next(iter(cache)))  # oldest first: a sweep moves on point by point
        cache[key] = token_logprobs(model, queries)
    return cache[key]


def _tensor_digest(value: torch.Tensor | None) -> str | None:
    if value is None:
        return None
    return hashlib.sha1(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _by_kind(rows: Sequence[PromptRow], field_name: str) -> dict[str, KindProbs]:
    out = {}
    for kind in ("rewrite", "paraphrase", "neighborhood"):
        values = {role: tuple(getattr(r, field_name) for r in rows if r.kind == kind and r.role == role)
                  for role in ("target", "true", "counter")}
        out[kind] = KindProbs(values["target"], values["true"] or None, values["counter"] or None)
    return out
