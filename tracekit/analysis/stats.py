"""The paper's statistics: R^2 of three OLS models, nested-model F-tests, correlations.

Models (Hase et al. 2023, Table 1), with edit layer as a categorical variable:
    tracing only        y ~ tracing_effect
    layer only          y ~ C(layer)
    layer x tracing     y ~ C(layer) * tracing_effect      (both terms, interacted)
The F-test compares the layer-only model with the layer x tracing model (nested): does the
tracing effect explain variance in edit success beyond the choice of layer?

The F-test, like the paper's, treats each (point, layer) row as independent, but a point is
edited at every layer, so its rows share whatever makes that fact easy or hard to edit.
``f_p_permuted`` asks the same question with points as the unit: it shuffles whole points'
tracing profiles among points and refits (a permutation test that respects that dependence;
``tracekit.analysis.permutation``). The same permutations give ``added_chance``, the added R^2
that tracing reaches by chance (95th percentile), and ``added_share`` puts the added R^2 on the
scale of what is left to explain: added / (1 - R^2 of layer).

``fit_r2_within`` is the relation-controlled version: one intercept per (relation, layer) in
both models, profiles shuffled only among points of the same relation. Its ``covariates`` add
one slope per (covariate, layer) to both models: e.g. the facts' log-probabilities of o_true
before and under the noise (``frames.with_probabilities``), which bear on both how much a
restored state can bring back and how hard a fact is to edit.

``holm`` adjusts a family of such p-values (the 20 cells of the study, say) for the number of
tests: of 20 cells with no effect, at least one passes p < 0.05 by chance in two studies of three
(1 - 0.95^20).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats as sps
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests
from statsmodels.tools.sm_exceptions import SingularMatrixWarning

from tracekit.analysis.checks import degenerate_layers, outcome_flags
from tracekit.analysis.permutation import profile_permutation
from tracekit.errors import TracekitError

FORMULAS = {
    "tracing": "{y} ~ tracing_effect",
    "layer": "{y} ~ C(layer)",
    "layer_x_tracing": "{y} ~ C(layer) * tracing_effect",
}


@dataclass(frozen=True)
class R2Fit:
    n: int
    r2_tracing: float
    r2_layer: float
    r2_layer_x_tracing: float
    added: float  # what tracing adds beyond layer: r2_layer_x_tracing - r2_layer
    f: float
    f_p: float  # p-value of the nested F-test (layer vs layer x tracing)
    df_num: float
    df_den: float
    f_p_permuted: float = float("nan")  # the same test with points exchangeable (NaN: no case_id, too few points)
    added_share: float = float("nan")  # added / (1 - r2_layer): the share of what layer leaves that tracing explains
    added_chance: float = float("nan")  # 95th percentile of added R^2 with points' profiles shuffled

    def as_row(self) -> dict:
        return asdict(self)


def _clean(df: pd.DataFrame, outcome: str) -> pd.DataFrame:
    if outcome not in df.columns:
        raise TracekitError(f"no {outcome!r} scores in the results (have: {', '.join(map(str, df.columns))})")
    data = df[[outcome, "tracing_effect", "layer"] + (["case_id"] if "case_id" in df.columns else [])].dropna()
    if data.empty:
        raise TracekitError(f"no results with both a {outcome} score and a tracing effect")
    return data


def fit_r2(df: pd.DataFrame, outcome: str = "rewrite", *, permutations: int = 1999) -> R2Fit:
    """R^2 of the three models and the nested F-test, on rows with ``outcome``, tracing_effect, layer."""
    data = _clean(df, outcome)
    n_layers = data["layer"].nunique()
    if len(data) <= 2 * n_layers + 1:
        raise TracekitError(f"{len(data)} results are too few to fit layer x tracing over {n_layers} layers")
    if float(data[outcome].std()) < 1e-12:  # a constant outcome has no variance to explain
        nan = float("nan")
        return R2Fit(len(data), nan, nan, nan, nan, nan, nan, nan, nan)
    with warnings.catch_warnings():
        # A layer where every point has the same effect makes the interaction column redundant;
        # OLS then uses the pseudo-inverse, and R^2 and the rank-based F-test stay well defined.
        warnings.simplefilter("ignore", SingularMatrixWarning)
        fits = {name: smf.ols(formula.format(y=outcome), data=data).fit() for name, formula in FORMULAS.items()}
    test = anova_lm(fits["layer"], fits["layer_x_tracing"])  # with one layer this is y ~ 1 vs y ~ tracing
    f, p, df_num = float(test["F"].iloc[1]), float(test["Pr(>F)"].iloc[1]), float(test["df_diff"].iloc[1])
    r2 = {name: float(fit.rsquared) for name, fit in fits.items()}
    test = (profile_permutation(data, outcome, permutations=permutations) if "case_id" in data.columns
            and permutations > 0 else None)
    added = r2["layer_x_tracing"] - r2["layer"]
    return R2Fit(n=len(data), r2_tracing=r2["tracing"], r2_layer=r2["layer"], r2_layer_x_tracing=r2["layer_x_tracing"],
                 added=added, f=f, f_p=p, df_num=df_num, df_den=float(fits["layer_x_tracing"].df_resid),
                 f_p_permuted=test.p if test else float("nan"), added_share=_share(added, r2["layer"]),
                 added_chance=test.chance if test else float("nan"))


def _share(added: float, r2_base: float) -> float:
    left = 1.0 - r2_base
    return added / left if left > 1e-12 else float("nan")


def point_permutation_p(data: pd.DataFrame, outcome: str = "rewrite", permutations: int = 1999, seed: int = 0,
                        min_points: int = 10) -> float:
    """p-value of the layer vs layer x tracing test when points, not rows, are exchangeable: whole
    tracing profiles shuffled among the points that have every layer of ``data``
    (``permutation.profile_permutation``). NaN with fewer than ``min_points`` such points."""
    test = profile_permutation(data, outcome, permutations=permutations, seed=seed, min_points=min_points)
    return test.p if test is not None else float("nan")


@dataclass(frozen=True)
class WithinFit:
    """Layer vs layer x tracing with one intercept per (``control``, layer) cell in both models (one
    per layer without a control) and one slope per (covariate, layer)."""
    n: int
    groups: int
    r2_control_layer: float  # y ~ C(control):C(layer) [+ C(layer):covariate ...]
    r2_control_layer_x_tracing: float  # ... + C(layer):tracing_effect (one slope per layer)
    added: float
    added_share: float
    f_p: float  # row-wise nested F-test
    p_permuted: float  # profiles shuffled within each control group (points as the unit)
    added_chance: float  # 95th percentile of added R^2 under those permutations

    def as_row(self) -> dict:
        return asdict(self)


def fit_r2_within(df: pd.DataFrame, outcome: str = "rewrite", control: str | None = "relation", *,
                  covariates: tuple[str, ...] = (), permutations: int = 1999) -> WithinFit:
    """``fit_r2``'s added-R^2 test controlled for ``control`` (a column, e.g. the facts' relation;
    None: layer only) and for per-point ``covariates`` (columns; one slope per layer each)."""
    needed = ([control] if control else []) + list(covariates)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise TracekitError(f"no {', '.join(map(repr, missing))} column to control for; add it first "
                            f"(frames.with_relation, frames.with_probabilities)")
    data = _clean(df, outcome).join(df[needed]).dropna()
    cells = data.groupby([control, "layer"]).ngroups if control else data["layer"].nunique()
    if len(data) <= cells + (2 + len(covariates)) * data["layer"].nunique():
        what = f"{control} x layer cells" if control else "layers"
        raise TracekitError(f"{len(data)} results are too few to fit {cells} {what} and their slopes")
    nan = float("nan")
    groups = int(data[control].nunique()) if control else 1
    if float(data[outcome].std()) < 1e-12:
        return WithinFit(len(data), groups, nan, nan, nan, nan, nan, nan, nan)
    base_formula = f"{outcome} ~ " + " + ".join([f"C({control}):C(layer)" if control else "C(layer)"]
                                                 + [f"C(layer):{c}" for c in covariates])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingularMatrixWarning)
        base = smf.ols(base_formula, data=data).fit()
        full = smf.ols(base_formula + " + C(layer):tracing_effect", data=data).fit()
    test = anova_lm(base, full)
    test_p = (profile_permutation(data, outcome, within=control, covariates=tuple(covariates),
                                  permutations=permutations)
              if "case_id" in data.columns and permutations > 0 else None)
    added = float(full.rsquared - base.rsquared)
    return WithinFit(n=len(data), groups=groups, r2_control_layer=float(base.rsquared),
                     r2_control_layer_x_tracing=float(full.rsquared), added=added,
                     added_share=_share(added, float(base.rsquared)), f_p=float(test["Pr(>F)"].iloc[1]),
                     p_permuted=test_p.p if test_p else nan, added_chance=test_p.chance if test_p else nan)


def r2_grid(df: pd.DataFrame, outcome: str = "rewrite", by: tuple[str, ...] = ("problem", "method"), *,
            within: str | None = None, covariates: tuple[str, ...] = (), drop_degenerate: bool = False,
            permutations: int = 1999) -> pd.DataFrame:
    """``fit_r2`` for each group (the paper's Fig. 6 / Tables 3-6: problems x methods), each row with
    its outcome's flags (``checks.outcome_flags``: ceiling, floor, degenerate layers).

    ``within`` / ``covariates``: ``fit_r2_within`` controlled for that column / those columns instead.
    ``drop_degenerate``: fit without the layers where the outcome is the same for every point."""
    rows = []
    for group, part in df.groupby(list(by), sort=True):
        group = group if isinstance(group, tuple) else (group,)
        flags = outcome_flags(part, outcome)
        if drop_degenerate and flags["degenerate_layers"]:
            part = part[~part["layer"].isin(degenerate_layers(part, outcome))]
        try:
            fit = (fit_r2_within(part, outcome, within, covariates=covariates, permutations=permutations)
                   if within or covariates else fit_r2(part, outcome, permutations=permutations))
        except TracekitError:
            continue  # too few results in this cell; the others still make a table
        rows.append({**dict(zip(by, group)), **fit.as_row(), **flags})
    if not rows:
        raise TracekitError(f"no group of {', '.join(by)} has enough {outcome} results to fit the models")
    return pd.DataFrame(rows)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (family-wise error rate, no assumption
    about how the tests depend on each other); NaN (no test) stays NaN and is not counted."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        adjusted[tested] = multipletests(p[tested], method="holm")[1]
    return adjusted


def pearson(x, y) -> tuple[float, float, int]:
    """Pearson rho, two-sided p, n (NaN pairs dropped)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), int(len(x))
    result = sps.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue), int(len(x))


def correlations(df: pd.DataFrame, outcome: str = "rewrite",
                 by: tuple[str, ...] = ("problem", "method", "layer")) -> pd.DataFrame:
    """Pearson correlation of ``outcome`` and tracing effect per group (Fig. 4 at one layer, Fig. 15 per layer)."""
    _clean(df, outcome)
    rows = []
    for group, part in df.groupby(list(by), sort=True):
        group = group if isinstance(group, tuple) else (group,)
        rho, p, n = pearson(part["tracing_effect"], part[outcome])
        flags = outcome_flags(part, outcome)
        rows.append({**dict(zip(by, group)), "rho": rho, "p": p, "n": n, "at_ceiling": flags["at_ceiling"],
                     "at_floor": flags["at_floor"]})
    return pd.DataFrame(rows)


def effect_by_layer(traces: pd.DataFrame, column: str = "effect",
                    by: tuple[str, ...] = ("model", "kind", "window")) -> pd.DataFrame:
    """Mean tracing effect per layer with its standard error (Fig. 1/2/10)."""
    if traces.empty:
        raise TracekitError("the store has no traces; run recipes/trace_dataset.py first")
    grouped = traces.groupby([*by, "layer"], sort=True)[column]
    out = grouped.agg(["mean", "sem", "count"]).reset_index()
    return out.rename(columns={"count": "n"})


def mean_scores_by_layer(edits: pd.DataFrame, scores=("rewrite", "paraphrase", "neighborhood", "overall")) -> pd.DataFrame:
    """Average edit scores per (problem, method, layer) (the paper's Fig. 7)."""
    present = [s for s in scores if s in edits.columns]
    if edits.empty or not present:
        raise TracekitError("the store has no edit scores; run recipes/edit_sweep.py first")
    return edits.groupby(["problem", "method", "layer"], sort=True)[present].mean().reset_index()
