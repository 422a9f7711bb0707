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
tracing profiles among points and refits (a permutation test that respects that dependence).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats as sps
from statsmodels.stats.anova import anova_lm
from statsmodels.tools.sm_exceptions import SingularMatrixWarning

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

    def as_row(self) -> dict:
        return asdict(self)


def _clean(df: pd.DataFrame, outcome: str) -> pd.DataFrame:
    if outcome not in df.columns:
        raise TracekitError(f"no {outcome!r} scores in the results (have: {', '.join(map(str, df.columns))})")
    data = df[[outcome, "tracing_effect", "layer"] + (["case_id"] if "case_id" in df.columns else [])].dropna()
    if data.empty:
        raise TracekitError(f"no results with both a {outcome} score and a tracing effect")
    return data


def fit_r2(df: pd.DataFrame, outcome: str = "rewrite") -> R2Fit:
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
    permuted = point_permutation_p(data, outcome) if "case_id" in data.columns else float("nan")
    return R2Fit(n=len(data), r2_tracing=r2["tracing"], r2_layer=r2["layer"], r2_layer_x_tracing=r2["layer_x_tracing"],
                 added=r2["layer_x_tracing"] - r2["layer"], f=f, f_p=p, df_num=df_num,
                 df_den=float(fits["layer_x_tracing"].df_resid), f_p_permuted=permuted)


def point_permutation_p(data: pd.DataFrame, outcome: str = "rewrite", permutations: int = 1999, seed: int = 0,
                        min_points: int = 10) -> float:
    """p-value of the layer vs layer x tracing test when points, not rows, are exchangeable.

    Uses the points edited at every layer of ``data``. Under the null, which point a tracing
    profile (its effects at all layers) belongs to does not matter, so the profiles are shuffled
    among points, keeping each profile whole. The layer x tracing model is a separate line per
    layer, so its residual sum of squares is a sum of per-layer simple regressions, computed for
    every permutation at once. The layer-only model does not involve tracing, so a smaller
    residual sum of squares is a larger F. NaN with fewer than ``min_points`` complete points.
    """
    wide = data.pivot_table(index="case_id", columns="layer", values=[outcome, "tracing_effect"],
                            aggfunc="first").dropna()  # only points with every layer
    y, t = wide[outcome].to_numpy(), wide["tracing_effect"].to_numpy()  # (points, layers) each
    if len(y) < min_points:
        return float("nan")
    rng = np.random.default_rng(seed)
    orders = np.stack([np.arange(len(t))] + [rng.permutation(len(t)) for _ in range(permutations)])
    ssr = _per_layer_line_ssr(y, t[orders])  # (1 + permutations,)
    # Ties within float round-off count as "as extreme", so a profile-free outcome gives p = 1.
    return float((ssr[1:] <= ssr[0] * (1 + 1e-12)).sum() + 1) / (permutations + 1)


def _per_layer_line_ssr(y: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Residual sum of squares of y ~ a_l + b_l t, summed over layers, for each t in a batch.

    y: (points, layers); t: (batch, points, layers). A layer with constant t keeps its intercept
    only, as least squares with the pseudo-inverse does."""
    yc = y - y.mean(axis=0)
    tc = t - t.mean(axis=1, keepdims=True)
    sxx = (tc ** 2).sum(axis=1)
    sxy = (tc * yc).sum(axis=1)
    explained = np.divide(sxy ** 2, sxx, out=np.zeros_like(sxx), where=sxx > 1e-12 * (1 + sxx.max()))
    return (yc ** 2).sum() - explained.sum(axis=1)


def r2_grid(df: pd.DataFrame, outcome: str = "rewrite", by: tuple[str, ...] = ("problem", "method")) -> pd.DataFrame:
    """``fit_r2`` for each group (the paper's Fig. 6 / Tables 3-6: problems x methods)."""
    rows = []
    for group, part in df.groupby(list(by), sort=True):
        group = group if isinstance(group, tuple) else (group,)
        try:
            fit = fit_r2(part, outcome)
        except TracekitError:
            continue  # too few results in this cell; the others still make a table
        rows.append({**dict(zip(by, group)), **fit.as_row()})
    if not rows:
        raise TracekitError(f"no group of {', '.join(by)} has enough {outcome} results to fit the models")
    return pd.DataFrame(rows)


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
        rows.append({**dict(zip(by, group)), "rho": rho, "p": p, "n": n})
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
