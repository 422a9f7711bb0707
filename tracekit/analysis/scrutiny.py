"""Outputs beyond the paper's own, that say what its numbers can carry.

Each function writes its tables through ``table(df, name, title)`` (``paper_analyses``'s writer)
and adds its notes and headline numbers to the ``Summary``:
- relation-controlled R^2 (one intercept per relation x layer, facts shuffled within relation),
  beside the pooled numbers;
- R^2 given the facts' probabilities: what tracing adds beyond their log p(o_true), clean and
  noised, each with a slope per layer (and relation, where known);
- R^2 without degenerate layers (where every point scores the same);
- the practical check: each fact edited at its peak-tracing layer vs one fixed layer;
- essence and Meng et al.'s unscaled metrics as outcomes, and their means by layer;
- the concentrated subset's peak layers (windows that hold MLP 0 act as part of the embedding);
- a plain list of the flags (ceiling, floor, degenerate layers, chance) of the rewrite table;
- one row per (problem, method) cell: our numbers, their chance level, the paper's, a verdict.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracekit.analysis import checks as C
from tracekit.analysis import frames as F
from tracekit.analysis import stats as S
from tracekit.analysis.published import PAPER_MAX_ADDED, paper_cell
from tracekit.errors import TracekitError

# Meng et al.'s unscaled metrics (the paper's Fig. 14) and the essence score, as stored by the edit sweep.
UNSCALED = ("efficacy_success", "efficacy_magnitude", "paraphrase_success", "paraphrase_magnitude",
            "neighborhood_success", "neighborhood_magnitude")


def relation_controlled(joined, relations, table, summary, localisation, permutations, outcome: str = "rewrite",
                        name: str = "table3", pooled: pd.DataFrame | None = None) -> pd.DataFrame:
    """Added R² of ``outcome`` pooled and with relation x layer intercepts (facts shuffled within
    relation); for the rewrite score also by relation without degenerate layers, and headlines.
    ``pooled``: the pooled ``r2_grid`` of ``outcome`` if the caller has it (``pooled_and_within``)."""
    split = F.with_relation(joined, relations)
    merged = pooled_and_within(split, outcome, permutations, pooled)
    table(merged, f"{name}_r2_{outcome}_within_relation",
          f"R² for {outcome} score, pooled and with relation x layer intercepts (facts shuffled within relation; "
          f"{localisation})")
    if outcome != "rewrite":
        return merged
    for row in merged.itertuples(index=False):
        summary.headline[f"relation-controlled added R² ({row.method}, {row.problem})"] = (
            f"{row.added:.3f} (p facts {row.p_permuted:.2g}; pooled {row.added_pooled:.3f}, "
            f"p facts {row.p_facts_pooled:.2g})")
    by_relation = S.r2_grid(split, "rewrite", by=("relation", "problem", "method"), drop_degenerate=True,
                            permutations=permutations)
    table(by_relation, "table3_r2_rewrite_by_relation_without_degenerate",
          f"R² for rewrite score by relation, degenerate layers left out ({localisation})")
    return merged


def pooled_and_within(split, outcome: str, permutations: int, pooled: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (problem, method): the added R² of ``outcome`` pooled (``*_pooled`` columns) beside the
    same with relation x layer intercepts and facts shuffled within relation. ``split``: edits
    joined with tracing effects and relations (``frames.with_relation``). ``pooled``: the pooled
    ``r2_grid`` already computed on the same edits: recomputing it gives the same frame (its
    permutations, most of the cost, are seeded per fit), so it is not done twice."""
    if pooled is None:
        pooled = S.r2_grid(split, outcome, permutations=permutations)
    within = S.r2_grid(split, outcome, within="relation", permutations=permutations)
    keys = ["problem", "method"]
    side = pooled[keys + ["added", "added_share", "f_p", "f_p_permuted", "added_chance"]].rename(
        columns={"added": "added_pooled", "added_share": "share_pooled", "f_p": "f_p_pooled",
                 "f_p_permuted": "p_facts_pooled", "added_chance": "chance_pooled"})
    return side.merge(within.drop(columns=["at_ceiling", "at_floor", "degenerate_layers"]), on=keys)


def given_probabilities(joined, traces, kind, window, relations, table, summary, localisation,
                        permutations, name: str = "table3_r2_rewrite_given_probabilities",
                        label: str = "added R² given the facts' log p(o_true), clean and noised") -> pd.DataFrame:
    """The rewrite R² tracing adds once the facts' log p(o_true), clean and under the subject noise,
    each have a slope per layer in both models (and, with ``relations``, relation x layer
    intercepts). The tracing effect is a share of p_clean - p_noise, and a fact whose noised
    prompt still gives o_true much probability may also be easier to force back to it: a tracing
    effect that only stands in for those numbers vanishes here. The probabilities come from the
    ``kind``/``window`` traces whatever measured the tracing effect in ``joined`` (they are the
    facts' own, so the robustness tables control for the same numbers); ``name`` / ``label``: the
    table's file name and the summary headline's key."""
    split = F.with_probabilities(joined, traces, kind=kind, window=window)
    keys = ["problem", "method"]
    columns = ["added", "added_share", "p_permuted", "added_chance"]
    given = S.r2_grid(split, "rewrite", covariates=F.PROBABILITIES, permutations=permutations)
    out = given[keys + ["n", "r2_control_layer", "r2_control_layer_x_tracing"] + columns]
    in_relation = False
    if relations is not None:
        both = F.with_relation(split, relations)
        if both["relation"].nunique() > 1:
            within = S.r2_grid(both, "rewrite", within="relation", covariates=F.PROBABILITIES,
                               permutations=permutations)
            side = within[keys + ["r2_control_layer"] + columns].rename(
                columns={c: f"{c}_in_relation" for c in ["r2_control_layer"] + columns})
            out = out.merge(side, on=keys, how="left")
            in_relation = True
    tested = "p_permuted_in_relation" if in_relation else "p_permuted"
    out = out.assign(p_holm=S.holm(out[tested]))
    scope = (" (and relation x layer intercepts: *_in_relation); facts shuffled within relation" if in_relation
             else "; facts shuffled")
    table(out, name,
          f"R² for rewrite score that tracing adds beyond layer x log p(o_true) clean and noised{scope}; "
          f"p_holm: {tested} adjusted over the cells ({localisation})")
    summary.headline[label] = (
        f"{int((out[tested] < 0.05).sum())} of {int(out[tested].notna().sum())} cells with facts-shuffled "
        f"p < 0.05{' (relation controlled too)' if in_relation else ''}, "
        f"{int((out['p_holm'] < 0.05).sum())} after Holm's adjustment")
    return out


def verdict(added: float, chance: float, p_facts: float) -> str:
    """What one cell's added R² says: within chance, or above it and how it compares with the paper;
    "not tested" where the permutation test could not run (fewer than 10 points with every layer,
    or no permutations asked for)."""
    if np.isnan(added):
        return "no fit"
    if np.isnan(chance) or np.isnan(p_facts):
        return "not tested"
    if not (added > chance) or not (p_facts < 0.05):
        return "within chance"
    return "above chance and above the paper's maximum" if added > PAPER_MAX_ADDED else "above chance"


def cell_table(grid, joined, within, table, summary, localisation) -> pd.DataFrame:
    """One row per (problem, method): points, R² of layer and of layer x tracing, the added R², its
    share of what layer leaves, its chance level and facts-shuffled p, the same controlled for
    relation (``within``, if given), the ceiling and floor shares, degenerate layers, the paper's
    figure, a verdict (``verdict``; within relation where that was tested, else pooled), and the
    verdict's p-value adjusted for the number of cells (``p_holm``, Holm over the fitted cells)."""
    points = joined.groupby(["problem", "method"])["case_id"].nunique().rename("points").reset_index()
    cells = grid.merge(points, on=["problem", "method"])
    keep = ["problem", "method", "points", "n", "r2_layer", "r2_layer_x_tracing", "added", "added_share",
            "added_chance", "f_p_permuted"]
    cells = cells[keep + ["at_ceiling", "at_floor", "degenerate_layers"]].rename(columns={"f_p_permuted": "p_facts"})
    if within is not None:
        side = within[["problem", "method", "added", "p_permuted", "added_chance"]].rename(
            columns={"added": "added_in_relation", "p_permuted": "p_in_relation", "added_chance": "chance_in_relation"})
        cells = cells.merge(side, on=["problem", "method"], how="left")

    def tested(row) -> tuple[float, float, float]:  # the (added, chance, p) the verdict reads
        if within is not None and not np.isnan(row.added_in_relation):
            return row.added_in_relation, row.chance_in_relation, row.p_in_relation
        return row.added, row.added_chance, row.p_facts

    judged = [tested(row) for row in cells.itertuples(index=False)]
    cells["paper"] = [paper_cell(p, m) for p, m in zip(cells["problem"], cells["method"])]
    cells["verdict"] = [verdict(*t) for t in judged]
    cells["p_holm"] = S.holm([p if not np.isnan(added) else np.nan for added, _, p in judged])
    table(cells, "cells_rewrite", "Every (problem, method) cell: rewrite R² over layer with tracing, chance, the "
                                  f"paper's figure ({localisation}; verdict: added R² above its 95% chance level "
                                  "with facts-shuffled p < 0.05, within relation where tested; p_holm: that p "
                                  "adjusted for the number of cells)")
    above = cells[cells["verdict"].str.startswith("above chance")]
    held = above[above["p_holm"] < 0.05]
    fitted = int(cells["p_holm"].notna().sum())
    summary.headline["cells where tracing adds R² above chance"] = (
        f"{len(above)} of {len(cells)}" + (": " + ", ".join(f"{r.method} {r.problem} ({r.added:.3f})"
                                                          for r in above.itertuples()) if len(above) else "")
        + f"; {len(held)} after Holm's adjustment for {fitted} cells"
        + (": " + ", ".join(f"{r.method} {r.problem}" for r in held.itertuples()) if len(held) else ""))
    return cells


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


def other_outcomes(joined, table, summary, localisation, permutations, relations=None) -> None:
    """Essence and the unscaled metrics: analysed like the paper's scores, not only stored; with
    ``relations`` (two or more), also controlled for relation like Tables 3-6."""
    present = [o for o in ("essence", *UNSCALED) if o in joined.columns and joined[o].notna().any()]
    if not present:
        summary.notes.append("no essence or unscaled scores in the store: their tables skipped")
        return
    table(S.mean_scores_by_layer(joined, scores=present), "fig8_essence_and_unscaled_by_layer",
          "Mean essence score and Meng et al.'s unscaled metrics by layer")
    grids = {}
    for outcome in present:
        try:
            grids[outcome] = S.r2_grid(joined, outcome, permutations=permutations)
        except TracekitError as err:
            summary.notes.append(f"R² for {outcome} skipped: {err}")
    if grids:
        grid = pd.concat([g.assign(outcome=o) for o, g in grids.items()], ignore_index=True)
        grid = grid[["outcome"] + [c for c in grid.columns if c != "outcome"]]
        table(grid, "fig14_r2_essence_and_unscaled",
              f"R² for the essence score and Meng et al.'s unscaled metrics ({localisation})")
        if grid["added"].notna().any():  # a constant outcome has no R^2
            summary.headline["max R² added by tracing (essence, unscaled)"] = (
                f"{grid['added'].max():.3f} ({grid.loc[grid['added'].idxmax(), 'outcome']})")
    if relations is None:
        return
    split = F.with_relation(joined, relations)
    if split["relation"].nunique() < 2:
        return
    controlled = []
    for outcome in present:
        try:
            controlled.append(pooled_and_within(split, outcome, permutations, grids.get(outcome))
                              .assign(outcome=outcome))
        except TracekitError as err:
            summary.notes.append(f"relation-controlled R² for {outcome} skipped: {err}")
    if controlled:
        frame = pd.concat(controlled, ignore_index=True)
        # One problem's outcomes x methods are one family: a look at seven outcomes for each of four
        # methods is 28 chances for one to pass by luck.
        frame["p_holm"] = frame.groupby("problem")["p_permuted"].transform(lambda p: S.holm(p.to_numpy()))
        table(frame[["outcome"] + [c for c in frame.columns if c != "outcome"]],
              "fig14_r2_essence_and_unscaled_within_relation",
              f"R² for the essence score and Meng et al.'s unscaled metrics, pooled and with relation x layer "
              f"intercepts (facts shuffled within relation; {localisation}; p_holm: p adjusted over one "
              f"problem's outcomes x methods)")


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


__all__ = ["UNSCALED", "cell_table", "concentrated_peaks", "flag_notes", "other_outcomes", "practical_check",
           "relation_controlled", "verdict", "without_degenerate"]
