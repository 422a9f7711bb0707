"""The edit scores as pure functions over probabilities (tests feed hand-computed numbers);
``editing.metrics`` gathers the probabilities and documents the two scorings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # metrics imports this module: the row type is only named here
    from tracekit.editing.metrics import PromptRow

ESSENCE_CAP = 5.0  # a perplexity rise of 5 or more is maximally bad
RECOVERED_FLOOR = 2e-8  # make_editing_results_df: max(2e-8, recovered)


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


def text_perplexity(logprobs: Sequence[float]) -> float:
    """The paper code's perplexity of one text from the log-probs of its tokens 2..n:
    exp(-sum / n), n counting the first token too."""
    return math.exp(-float(np.sum(logprobs)) / (len(logprobs) + 1))


def paper_code_scores(p_before: float, p_after: float, minimize: bool) -> float:
    """make_editing_results_df's rewrite/paraphrase score: erased share floored at 0 (erasure),
    else recovered share floored at 2e-8."""
    if minimize:
        return max(0.0, (p_before - p_after) / p_before)
    return max(RECOVERED_FLOOR, 1 - (1 - p_after) / (1 - p_before))


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


def paper_code_point_scores(rows: Sequence[PromptRow], *, minimize: bool, ppl_before: float | None = None,
                            ppl_after: float | None = None) -> dict[str, float]:
    """make_editing_results_df on one point: rewrite/paraphrase/neighbourhood scores from the FIRST
    prompt of each kind (p of the target), the unscaled metrics over all prompts (target vs baseline)."""
    def probs(kind, role, when):
        return [getattr(r, when) for r in rows if r.kind == kind and r.role == role]

    out: dict[str, float] = {}
    for kind in ("rewrite", "paraphrase", "neighborhood"):
        before, after = probs(kind, "target", "p_before"), probs(kind, "target", "p_after")
        if not before:
            out[kind] = math.nan
        elif kind == "neighborhood":
            out[kind] = 1 - abs(after[0] - before[0]) / (abs(before[0] - 0.5) + 0.5)
        else:
            out[kind] = paper_code_scores(before[0], after[0], minimize)
    out["overall"] = overall_score(out["rewrite"], out["paraphrase"], out["neighborhood"])
    out["essence"] = essence_score(ppl_before, ppl_after) if ppl_before is not None and ppl_after is not None else math.nan
    for name, kind in (("efficacy", "rewrite"), ("paraphrase", "paraphrase"), ("neighborhood", "neighborhood")):
        target, baseline = probs(kind, "target", "p_after"), probs(kind, "baseline", "p_after")
        win, lose = (baseline, target) if kind == "neighborhood" else (target, baseline)
        out[f"{name}_success"], out[f"{name}_magnitude"] = success_rate(win, lose), magnitude(win, lose)
    return out
