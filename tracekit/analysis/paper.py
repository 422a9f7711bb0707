"""Every output of the paper's analysis from a store's traces and edits, in one call.

``paper_analyses(traces, edits, out_dir)`` writes tables (Markdown + CSV, printed with rich)
and figures (PNG), and returns a ``Summary`` listing them with the headline numbers. Every R^2
table carries its flags (ceiling and floor shares, degenerate layers, the chance level of added
R^2, the added R^2 as a share of what layer leaves), and ``scrutiny`` adds the checks the paper
did not make (relation-controlled tests, the peak-layer practical check, essence and unscaled
metrics as outcomes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console

from tracekit.analysis import figures
from tracekit.analysis import frames as F
from tracekit.analysis import scrutiny as X
from tracekit.analysis import stats as S
from tracekit.analysis.published import with_paper
from tracekit.analysis.report import save_table
from tracekit.errors import TracekitError

OUTCOMES = {"rewrite": "table3", "paraphrase": "table4", "neighborhood": "table5", "overall": "table6"}
PRIMARY = ("error-injection", "rome")  # the paper's Table 1 / Fig. 4 condition


@dataclass
class Summary:
    outputs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    headline: dict = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # what qualifies a number: ceiling, degenerate layers, chance
    title: str = "tracekit analysis"

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        lines += [f"- {k}: {with_paper(k, v)}" for k, v in self.headline.items()] + [""]
        lines += (["## Flags", ""] + [f"- {f}" for f in self.flags] + [""]) if self.flags else []
        lines += [f"- note: {n}" for n in self.notes] + ([""] if self.notes else [])
        lines += ["## Files", ""] + [f"- {p.name}" for p in self.outputs]
        return "\n".join(lines) + "\n"


def default_layer_of(joined: pd.DataFrame) -> int:
    """Without a given default layer: the layer where ROME (else any method) rewrites best on average."""
    rome = joined[joined["method"] == "rome"]
    base = rome if not rome.empty else joined
    return int(base.groupby("layer")["rewrite"].mean().idxmax())


def paper_analyses(traces: pd.DataFrame, edits: pd.DataFrame, out_dir: str | Path, *, kind: str = "mlp",
                   window: int = 5, reduce: str = "max", default_layer: int | None = None,
                   robustness: bool = True, relations: pd.DataFrame | None = None, permutations: int = 1999,
                   title: str | None = None, console: Console | None = None) -> Summary:
    """``relations`` (``frames.relations_frame``): also split Fig. 4 and Table 3 by the facts' relation
    and control the added-R^2 test for it. ``permutations``: of the facts-shuffled tests and chance
    levels (0: none). ``title``: the summary's heading (say which dataset this is)."""
    out = Path(out_dir)
    summary = Summary(title=title or "tracekit analysis")

    def table(df, name, title):
        summary.outputs.extend(save_table(df, out, name, title, console))

    def optional(make, *args):  # an output the data cannot support is a note, not the end of the analysis
        try:
            return make(*args)
        except TracekitError as err:
            summary.notes.append(f"{getattr(make, '__name__', 'a table').replace('_', ' ')} skipped: {err}")

    # Fig. 1/2/10: tracing effect by layer, every kind and window stored.
    by_layer = S.effect_by_layer(traces)
    table(by_layer, "fig1_effect_by_layer", "Mean tracing effect by layer (max over tokens)")
    summary.outputs.append(figures.save(figures.effect_by_layer(by_layer), out / "fig1_effect_by_layer.png"))
    if edits.empty:
        summary.notes.append("no edit results in the store: only the tracing figures were made")
        return _finish(summary, out)

    effects = F.tracing_effects(traces, kind=kind, window=window, reduce=reduce)
    joined = F.join_edits(edits, effects)
    localisation = f"{kind} window {window}, {reduce}"
    summary.headline["data"] = ", ".join(f"{d} ({n} points)" for d, n in
                                         joined.groupby("dataset")["case_id"].nunique().items())
    summary.headline["model"] = ", ".join(sorted(joined["model"].astype(str).unique()))
    summary.headline["localisation"] = localisation
    summary.headline["points"] = int(joined["case_id"].nunique())
    summary.headline["edit results"] = len(joined)
    table(S.mean_scores_by_layer(joined), "fig7_scores_by_layer", "Mean edit scores by layer")

    # Fig. 4: score vs tracing effect at the default layer.
    layer = default_layer if default_layer is not None else default_layer_of(joined)
    at_layer = F.select(joined, layer=layer)
    corr = S.correlations(at_layer, "rewrite", by=("problem", "method"))
    table(corr, "fig4_correlation", f"rewrite score vs tracing effect at layer {layer} ({localisation})")
    for row in corr.itertuples(index=False):
        cell = at_layer[(at_layer["problem"] == row.problem) & (at_layer["method"] == row.method)]
        figure = figures.score_vs_tracing(cell, row.rho, row.p, title=f"{row.method}, {row.problem}, layer {layer}")
        summary.outputs.append(figures.save(figure, out / f"fig4_{row.method}_{row.problem}.png"))
    summary.headline["default layer"] = layer

    # Table 1 (primary condition), Fig. 6 / Tables 3-6 (every condition, every outcome).
    problem, method = PRIMARY if ((joined["problem"] == PRIMARY[0]) & (joined["method"] == PRIMARY[1])).any() \
        else joined[["problem", "method"]].iloc[0]
    fit = S.fit_r2(F.select(joined, problem=problem, method=method), "rewrite", permutations=permutations)
    table1 = pd.DataFrame([{"model": m, "R2": v} for m, v in
                           (("tracing only", fit.r2_tracing), ("layer", fit.r2_layer),
                            ("layer x tracing", fit.r2_layer_x_tracing))])
    table(table1, "table1_r2", f"R² for rewrite score, {method} / {problem} (n={fit.n}; F-test p={fit.f_p:.2g}, "
                               f"points permuted p={fit.f_p_permuted:.2g}; added {fit.added:.3f} = "
                               f"{fit.added_share:.3f} of what layer leaves; chance {fit.added_chance:.3f})")
    summary.headline[f"table 1 ({method}, {problem})"] = (f"tracing {fit.r2_tracing:.3f}, layer {fit.r2_layer:.3f}, "
                                                          f"layer x tracing {fit.r2_layer_x_tracing:.3f}")
    summary.headline[f"F-test p ({method}, {problem})"] = (f"rows independent {fit.f_p:.2g}, "
                                                           f"points permuted {fit.f_p_permuted:.2g}")
    rewrite_grid = within = None
    pooled: dict[str, pd.DataFrame] = {}  # outcome -> its r2_grid, reused by the relation-controlled tables
    for outcome, name in OUTCOMES.items():
        if outcome not in joined.columns:
            summary.notes.append(f"no {outcome} scores: {name} skipped")
            continue
        try:
            grid = S.r2_grid(joined, outcome, permutations=permutations)
        except TracekitError as err:
            summary.notes.append(f"{name} skipped: {err}")
            continue
        pooled[outcome] = grid
        table(grid, f"{name}_r2_{outcome}", f"R² for {outcome} score by problem and method ({localisation})")
        summary.headline[f"max R² added by tracing ({outcome})"] = (
            f"{grid['added'].max():.3f}; chance {grid['added_chance'].min():.3f}-{grid['added_chance'].max():.3f}")
        if outcome == "rewrite":
            rewrite_grid = grid
            summary.outputs.append(figures.save(figures.r2_bars(grid), out / "fig6_r2_rewrite.png"))
            X.flag_notes(grid, summary)
            if grid["degenerate_layers"].astype(bool).any():
                optional(X.without_degenerate, joined, table, summary, localisation, permutations)

    if relations is not None:  # a pooled correlation can come from relations that differ in both variables
        split = F.with_relation(joined, relations)
        table(S.correlations(F.select(split, layer=layer), "rewrite", by=("relation", "problem", "method")),
              "fig4_correlation_by_relation", f"rewrite score vs tracing effect at layer {layer}, by relation")
        optional(lambda: table(S.r2_grid(split, "rewrite", by=("relation", "problem", "method"),
                                         permutations=permutations), "table3_r2_rewrite_by_relation",
                               f"R² for rewrite score by relation, problem and method ({localisation})"))
        if split["relation"].nunique() > 1:
            within = optional(X.relation_controlled, joined, relations, table, summary, localisation, permutations,
                              "rewrite", "table3", pooled.get("rewrite"))
            for outcome, name in list(OUTCOMES.items())[1:]:  # paraphrase, neighbourhood, overall
                if outcome in joined.columns:
                    optional(X.relation_controlled, joined, relations, table, summary, localisation, permutations,
                             outcome, name, pooled.get(outcome))
    if rewrite_grid is not None:
        X.cell_table(rewrite_grid, joined, within, table, summary, localisation)
        optional(X.given_probabilities, joined, traces, kind, window, relations, table, summary, localisation,
                 permutations)

    optional(X.practical_check, joined, layer, table, summary)
    optional(X.other_outcomes, joined, table, summary, localisation, permutations, relations)

    # Fig. 15: per-layer correlations.
    per_layer = S.correlations(joined, "rewrite", by=("problem", "method", "layer"))
    table(per_layer, "fig15_correlation_by_layer", "rewrite vs tracing correlation per layer")
    summary.outputs.append(figures.save(figures.correlation_by_layer(per_layer),
                                        out / "fig15_correlation_by_layer.png"))

    # Table 2: points with concentrated effects.
    points = X.concentrated_peaks(F.tracing_effects(traces, kind=kind, window=window, reduce="max"), window, summary)
    subset = F.only_points(joined, points)
    summary.headline["concentrated points"] = f"{subset['case_id'].nunique()} of {joined['case_id'].nunique()}"
    try:
        table(S.r2_grid(subset, "rewrite", permutations=permutations), "table2_concentrated",
              f"R² for rewrite score, concentrated-effect points ({subset['case_id'].nunique()})")
        table(points, "table2_concentrated_points", "Concentrated-effect points and the layer where each peaks")
    except TracekitError as err:
        summary.notes.append(f"table 2 skipped: {err}")

    if robustness:
        _robustness(traces, edits, kind, window, reduce, table, summary, permutations, relations)
    return _finish(summary, out)


def _robustness(traces, edits, kind, window, reduce, table, summary, permutations, relations=None) -> None:
    """The rewrite R² with tracing measured another way; with ``relations``, also relation-controlled
    (a pooled effect that relation explains at window 5 must be tested the same way here); and
    given the facts' probabilities, as at the main window (``scrutiny.given_probabilities``)."""
    variants = [("window10", "window 10", kind, 10, reduce), ("last_subject", "last subject token", kind, window,
                                                                "last_subject"),
                ("zeroing", "representation zeroing", "zero", window, "max")]
    for name, label, v_kind, v_window, v_reduce in variants:
        if (v_kind, v_window, v_reduce) == (kind, window, reduce):
            continue
        try:
            joined = F.join_edits(edits, F.tracing_effects(traces, kind=v_kind, window=v_window, reduce=v_reduce))
            grid = S.r2_grid(joined, "rewrite", permutations=permutations)
            table(grid, f"robustness_{name}", f"R² for rewrite score, tracing by {label}")
            table(S.correlations(joined, "rewrite"), f"robustness_{name}_correlation_by_layer",
                  f"rewrite vs tracing correlation per layer, tracing by {label}")
            split = None if relations is None else F.with_relation(joined, relations)
            if split is not None and split["relation"].nunique() > 1:
                within = X.pooled_and_within(split, "rewrite", permutations, grid)
                within["p_holm"] = S.holm(within["p_permuted"])  # over this table's cells
                table(within, f"robustness_{name}_within_relation",
                      f"R² for rewrite score, tracing by {label}, pooled and with relation x layer intercepts "
                      f"(facts shuffled within relation; p_holm: adjusted over the cells)")
                summary.headline[f"robustness ({label}), relation-controlled"] = (
                    f"{int((within['p_permuted'] < 0.05).sum())} of {int(within['p_permuted'].notna().sum())} cells "
                    f"with facts-shuffled p < 0.05, {int((within['p_holm'] < 0.05).sum())} after Holm's adjustment")
        except TracekitError as err:
            summary.notes.append(f"robustness ({label}) skipped: {err}")
            continue
        try:  # the facts' probabilities from the main traces: zeroing stores no p_noise of its own
            X.given_probabilities(joined, traces, kind, window, relations, table, summary, f"tracing by {label}",
                                  permutations, name=f"robustness_{name}_given_probabilities",
                                  label=f"robustness ({label}), given the facts' log p(o_true)")
        except TracekitError as err:
            summary.notes.append(f"robustness ({label}) given probabilities skipped: {err}")


def _finish(summary: Summary, out: Path) -> Summary:
    path = out / "summary.md"
    path.write_text(summary.markdown())
    summary.outputs.append(path)
    return summary


__all__ = ["Summary", "paper_analyses"]
