"""Outputs beyond the paper's own, that say what its numbers can carry.

Each function writes its tables through ``table(df, name, title)`` (``paper_analyses``'s writer)
and adds its notes and headline numbers to the ``Summary``:
- relation-controlled R^2 (one intercept per relation x layer, facts shuffled within relation),
  beside the pooled numbers;
- R^2 without degenerate layers (where every point scores the same);
- the practical check: each fact edited at its peak-tracing layer vs one fixed layer;
- essence and Meng et al.'s unscaled metrics as outcomes, and their means by layer;
- the concentrated subset's peak layers (windows that hold MLP 0 act as part of the embedding);
- a plain list of the flags (ceiling, floor, degenerate layers, chance) of the rewrite table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracekit.analysis import checks as C
from tracekit.analysis import frames as F
from tracekit.analysis import stats as S
from tracekit.errors import TracekitError

# Meng et al.'s unscaled metrics (the paper's Fig. 14) and the essence score, as stored by the edit sweep.
UNSCALED = ("efficacy_success", "efficacy_magnitude", "paraphrase_success", "paraphrase_magnitude",
            "neighborhood_success", "neighborhood_magnitude")


def relation_controlled(joined, relations, table, summary, localisation, permutations) -> None:
    split = F.with_relation(joined, relations)
    pooled = S.r2_grid(split, "rewrite", permutations=permutations)
    within = S.r2_grid(split, "rewrite", within="relation", permutations=permutations)
    keys = ["problem", "method"]
    side = pooled[keys + ["added", "added_share", "f_p", "f_p_permuted", "added_chance"]].rename(
        columns={"added": "added_pooled", "added_share": "share_pooled", "f_p": "f_p_pooled",
                 "f_p_permuted": "p_facts_pooled", "added_chance": "chance_pooled"})
    merged = side.merge(within.drop(columns=["at_ceiling", "at_floor", "degenerate_layers"]), on=keys)
    table(merged, "table3_r2_rewrite_within_relation",
          f"R² for rewrite score, pooled and with relation x layer intercepts (facts shuffled within relation; "
          f"{localisation})")
    for row in merged.itertuples(index=False):
        summary.headline[f"relation-controlled added R² ({row.method}, {row.problem})"] = (
            f"{row.added:.3f} (p facts {row.p_permuted:.2g}; pooled {row.added_pooled:.3f}, "
            f"p facts {row.p_facts_pooled:.2g})")
    by_relation = S.r2_grid(split, "rewrite", by=("relation", "problem", "method"), drop_degenerate=True,
                            permutations=permutations)
    table(by_relation, "table3_r2_rewrite_by_relation_without_degenerate",
          f"R² for rewrite score by relation, degenerate layers left out ({localisation})")


def without_degenerate(joined, table, summary, localisation, permutations) -> None:
    grid = S.r2_grid(joined, "rewrite", drop_degenerate=True, permutations=permutations)
    table(grid, "table3_r2_rewrite_without_degenerate",
          f"R² for rewrite score, layers where every point scores within {C.DEGENERATE_SD} of the same left out "
          f"(the dropped layers are listed; {localisation})")


def practical_check(joined, default_layer, table, summary) -> None:
    """Fig. 17's question as a decision: edit at each fact's peak-tracing layer, or always at one layer?"""
    parts = []
    for outcome in ("rewrite", "overall"):
        if outcome not in joined.columns:
            continue
        for label, fixed in (("default layer", default_layer), ("best layer on average", None)):
            try:
                part = C.peak_layer_check(joined, outcome, fixed_layer=fixed)
            except TracekitError as err:
                summary.notes.append(f"peak-layer check ({outcome}, {label}) skipped: {err}")
                continue
            parts.append(part.assign(outcome=outcome, fixed=label))
    if not parts:
        return
    result = pd.concat(parts, ignore_index=True)
    front = ["outcome", "fixed", "problem", "method"]
    result = result[front + [c for c in result.columns if c not in front]]
    table(result, "practical_peak_vs_fixed_layer",
          "Edit each fact at its peak-tracing layer, or every fact at one layer? (Wilcoxon p of peak vs fixed)")
    best = result[(result["outcome"] == "rewrite") & (result["fixed"] == "best layer on average")]
    for row in best.itertuples(index=False):
        summary.headline[f"peak-tracing layer vs best fixed layer ({row.method}, {row.problem})"] = (
            f"rewrite {row.at_peak:.3f} vs {row.at_fixed:.3f} at layer {row.fixed_layer} (p {row.p:.2g})")


def other_outcomes(joined, table, summary, localisation, permutations) -> None:
    """Essence and the unscaled metrics: analysed like the paper's scores, not only stored."""
    present = [o for o in ("essence", *UNSCALED) if o in joined.columns and joined[o].notna().any()]
    if not present:
        summary.notes.append("no essence or unscaled scores in the store: their tables skipped")
        return
    table(S.mean_scores_by_layer(joined, scores=present), "fig8_essence_and_unscaled_by_layer",
          "Mean essence score and Meng et al.'s unscaled metrics by layer")
    grids = []
    for outcome in present:
        try:
            grids.append(S.r2_grid(joined, outcome, permutations=permutations).assign(outcome=outcome))
        except TracekitError as err:
            summary.notes.append(f"R² for {outcome} skipped: {err}")
    if grids:
        grid = pd.concat(grids, ignore_index=True)
        grid = grid[["outcome"] + [c for c in grid.columns if c != "outcome"]]
        table(grid, "fig14_r2_essence_and_unscaled",
              f"R² for the essence score and Meng et al.'s unscaled metrics ({localisation})")
        if grid["added"].notna().any():  # a constant outcome has no R^2
            summary.headline["max R² added by tracing (essence, unscaled)"] = (
                f"{grid['added'].max():.3f} ({grid.loc[grid['added'].idxmax(), 'outcome']})")


def concentrated_peaks(effects, window, summary) -> pd.DataFrame:
    """The concentrated points with their peak layer; how many peak in a window that holds layer 0."""
    points = F.concentrated_cases(effects)
    peaks = (effects.merge(points[F.POINT], on=F.POINT).sort_values("layer")
             .groupby(F.POINT, sort=True)[["layer", "tracing_effect"]]
             .apply(lambda g: int(g["layer"].to_numpy()[np.argmax(g["tracing_effect"].to_numpy())]))
             .rename("peak_layer").reset_index())
    at_zero = int(sum(C.window_holds_layer_zero(layer, window) for layer in peaks["peak_layer"]))
    if len(peaks):
        summary.headline["concentrated points peaking in a window that holds layer 0"] = f"{at_zero} of {len(peaks)}"
    return points.merge(peaks, on=F.POINT)


def flag_notes(grid: pd.DataFrame, summary, outcome: str = "rewrite") -> None:
    """Plain sentences for the cells whose R^2 the flags qualify."""
    for row in grid.itertuples(index=False):
        cell = f"{row.method}, {row.problem}"
        if row.at_ceiling >= 0.5:
            summary.flags.append(f"{cell}: {row.at_ceiling:.0%} of {outcome} scores are >= {C.CEILING} (ceiling); "
                                 f"its R² says little about tracing")
        if row.degenerate_layers:
            summary.flags.append(f"{cell}: at layer(s) {row.degenerate_layers} every point scores the same; "
                                 f"see table3_r2_{outcome}_without_degenerate")
        if row.added <= row.added_chance:
            summary.flags.append(f"{cell}: added R² {row.added:.3f} is within chance (95th percentile "
                                 f"{row.added_chance:.3f})")


__all__ = ["UNSCALED", "concentrated_peaks", "flag_notes", "other_outcomes", "practical_check",
           "relation_controlled", "without_degenerate"]
