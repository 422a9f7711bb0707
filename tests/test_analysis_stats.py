"""The regression code recovers known R^2 and F-test p-values; correlations; effect subsets."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from tracekit import TracekitError
from tracekit.analysis import (concentrated_cases, correlations, effect_by_layer, fit_r2, join_edits, pearson, r2_grid,
                               select, tracing_effects)
from tracekit.analysis.stats import point_permutation_p

LAYER_MEANS = np.linspace(0.0, 1.0, 8)


def synthetic(n_per_layer, beta, sigma=0.2, seed=0):
    """rewrite = a_layer + beta * tracing + noise; tracing ~ U(0, 1), independent of the layer."""
    rng = np.random.default_rng(seed)
    layer = np.repeat(np.arange(len(LAYER_MEANS)), n_per_layer)
    tracing = rng.uniform(0, 1, len(layer))
    rewrite = LAYER_MEANS[layer] + beta * tracing + rng.normal(0, sigma, len(layer))
    return pd.DataFrame({"layer": layer, "tracing_effect": tracing, "rewrite": rewrite})


def ssr_and_r2(X, y):
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    ssr = float(((y - X @ coef) ** 2).sum())
    return ssr, 1 - ssr / float(((y - y.mean()) ** 2).sum())


def test_r2_and_f_test_equal_hand_computed_least_squares():
    df = synthetic(25, beta=0.3, seed=1)
    y, t = df["rewrite"].to_numpy(), df["tracing_effect"].to_numpy()
    ones = np.ones(len(df))
    dummies = (df["layer"].to_numpy()[:, None] == np.arange(1, 8)[None, :]).astype(float)  # layer 0 = reference
    ssr_t, r2_t = ssr_and_r2(np.column_stack([ones, t]), y)
    ssr_l, r2_l = ssr_and_r2(np.column_stack([ones, dummies]), y)
    ssr_b, r2_b = ssr_and_r2(np.column_stack([ones, dummies, t, dummies * t[:, None]]), y)
    df_num, df_den = 8, len(df) - 16
    f = ((ssr_l - ssr_b) / df_num) / (ssr_b / df_den)

    fit = fit_r2(df, "rewrite")
    assert fit.n == 200 and (fit.df_num, fit.df_den) == (df_num, df_den)
    assert fit.r2_tracing == pytest.approx(r2_t, abs=1e-10)
    assert fit.r2_layer == pytest.approx(r2_l, abs=1e-10)
    assert fit.r2_layer_x_tracing == pytest.approx(r2_b, abs=1e-10)
    assert fit.added == pytest.approx(r2_b - r2_l, abs=1e-10)
    assert fit.f == pytest.approx(f, rel=1e-8)
    assert fit.f_p == pytest.approx(sps.f.sf(f, df_num, df_den), rel=1e-6)


def test_known_effect_is_recovered():
    var_layer, var_tracing, var_noise = LAYER_MEANS.var(), 0.6 ** 2 / 12, 0.2 ** 2
    total = var_layer + var_tracing + var_noise
    fit = fit_r2(synthetic(1000, beta=0.6), "rewrite")
    assert fit.r2_layer == pytest.approx(var_layer / total, abs=0.015)  # 0.605
    assert fit.r2_tracing == pytest.approx(var_tracing / total, abs=0.015)  # 0.169
    assert fit.r2_layer_x_tracing == pytest.approx((var_layer + var_tracing) / total, abs=0.015)  # 0.774
    assert fit.f_p < 1e-100


def test_no_effect_gives_uniform_p_values_and_nothing_added():
    fit = fit_r2(synthetic(1000, beta=0.0), "rewrite")
    assert fit.r2_tracing < 0.002 and 0 <= fit.added < 0.002
    assert fit.r2_layer == pytest.approx(LAYER_MEANS.var() / (LAYER_MEANS.var() + 0.04), abs=0.015)
    p_values = [fit_r2(synthetic(20, beta=0.0, seed=seed), "rewrite").f_p for seed in range(40)]
    assert sps.kstest(p_values, "uniform").pvalue > 0.01  # under no effect the F-test's p is uniform
    assert 0.0 <= np.mean(np.array(p_values) < 0.05) <= 0.15


def test_grid_over_problems_and_methods():
    cells = []
    for problem, beta in (("error-injection", 0.0), ("fact-forcing", 0.6)):
        for method in ("rome", "ft-1"):
            cells.append(synthetic(40, beta, seed=len(cells)).assign(problem=problem, method=method))
    grid = r2_grid(pd.concat(cells), "rewrite")
    assert list(zip(grid["problem"], grid["method"])) == [("error-injection", "ft-1"), ("error-injection", "rome"),
                                                          ("fact-forcing", "ft-1"), ("fact-forcing", "rome")]
    assert (grid[grid["problem"] == "fact-forcing"]["f_p"] < 1e-10).all()
    assert (grid[grid["problem"] == "error-injection"]["added"] < 0.05).all()
    with pytest.raises(TracekitError, match="no 'essence' scores"):
        fit_r2(cells[0], "essence")
    with pytest.raises(TracekitError, match="too few"):
        fit_r2(cells[0].iloc[::20], "rewrite")  # 16 results over 8 layers
    constant = cells[0].assign(rewrite=0.9)
    assert np.isnan(fit_r2(constant, "rewrite").r2_layer)


def edited_at_every_layer(n_points, beta, seed, point_sd=0.3):
    """Each point edited at all 8 layers, as in a sweep: its tracing effect is about the same at
    every layer, and a point-level term (how editable the fact is) is shared by its rows."""
    rng = np.random.default_rng(seed)
    point = np.repeat(np.arange(n_points), len(LAYER_MEANS))
    layer = np.tile(np.arange(len(LAYER_MEANS)), n_points)
    tracing = rng.uniform(0, 1, n_points)[point] + rng.normal(0, 0.05, len(point))
    rewrite = (LAYER_MEANS[layer] + beta * tracing + rng.normal(0, point_sd, n_points)[point]
               + rng.normal(0, 0.1, len(point)))
    return pd.DataFrame({"case_id": point, "layer": layer, "tracing_effect": tracing, "rewrite": rewrite})


def test_point_permutation_test_holds_its_level_where_the_row_f_test_does_not():
    fits = [fit_r2(edited_at_every_layer(60, beta=0.0, seed=seed), "rewrite") for seed in range(60)]
    rows_p = np.array([fit.f_p for fit in fits])
    points_p = np.array([fit.f_p_permuted for fit in fits])
    # Rows of one point are not independent, so the row-wise F-test rejects too often ...
    assert sps.kstest(rows_p, "uniform").pvalue < 1e-6 and np.mean(rows_p < 0.05) >= 0.1
    # ... while shuffling whole points keeps p uniform under no effect.
    assert sps.kstest(points_p, "uniform").pvalue > 0.01 and np.mean(points_p < 0.05) <= 0.1
    effect = fit_r2(edited_at_every_layer(60, beta=0.6, seed=0), "rewrite")
    assert effect.f_p_permuted < 0.01


def test_point_permutation_p_edge_cases():
    data = edited_at_every_layer(30, beta=0.0, seed=1)
    assert point_permutation_p(data, permutations=99) == point_permutation_p(data, permutations=99)  # seeded
    assert np.isnan(point_permutation_p(data[data["case_id"] < 9]))  # fewer than 10 complete points
    partial = data[~((data["case_id"] < 25) & (data["layer"] == 3))]  # only 5 points have every layer
    assert np.isnan(point_permutation_p(partial))
    assert np.isnan(fit_r2(data.drop(columns="case_id"), "rewrite").f_p_permuted)
    flat = data.assign(tracing_effect=data["layer"] / 10.0)  # no variation among points: nothing to test
    assert point_permutation_p(flat, permutations=99) == 1.0


def test_pearson_and_correlations():
    df = synthetic(30, beta=0.5, seed=3).assign(problem="p", method="m")
    rho, p, n = pearson(df["tracing_effect"], df["rewrite"])
    expected = np.corrcoef(df["tracing_effect"], df["rewrite"])[0, 1]
    t = expected * np.sqrt((n - 2) / (1 - expected ** 2))
    assert rho == pytest.approx(expected, abs=1e-12) and p == pytest.approx(2 * sps.t.sf(abs(t), n - 2), rel=1e-6)
    per_layer = correlations(df, "rewrite")
    assert len(per_layer) == 8 and (per_layer["n"] == 30).all()
    one = df[df["layer"] == 2]
    assert per_layer.set_index("layer").loc[2, "rho"] == pytest.approx(
        np.corrcoef(one["tracing_effect"], one["rewrite"])[0, 1], abs=1e-12)
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3])[0])


def traces_long(effects_by_case, kind="mlp", window=5):
    rows = [("m", "cf", case, kind, window, layer, value, value / 2, 0.5, 0.1)
            for case, values in effects_by_case.items() for layer, value in enumerate(values)]
    return pd.DataFrame(rows, columns=["model", "dataset", "case_id", "kind", "window", "layer", "effect",
                                       "effect_last", "p_clean", "p_noise"])


def test_concentrated_effects_subset():
    effects = {
        0: [0.0, 0.1, 1.0, 0.6, 0.5, 0.2, 0.0, 0.0],  # 2 others >= 0.5 x max: concentrated
        1: [0.5, 0.6, 0.8, 0.7, 0.0, 0.0, 0.0, 0.0],  # 3 others: concentrated (the limit)
        2: [0.5, 0.6, 0.8, 0.7, 0.4, 0.0, 0.0, 0.0],  # 4 others: not
        3: [0.0] * 8,  # no effect at all: not
        4: [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2],  # flat: not
    }
    effects_df = tracing_effects(traces_long(effects))
    chosen = concentrated_cases(effects_df)
    assert chosen["case_id"].tolist() == [0, 1] and chosen["others"].tolist() == [2, 3]


def test_tracing_effects_and_joins():
    traces = traces_long({0: [0.1, 0.9], 1: [0.3, 0.2]})
    assert tracing_effects(traces, reduce="last_subject")["tracing_effect"].tolist() == [0.05, 0.45, 0.15, 0.1]
    with pytest.raises(TracekitError, match=r"no traces of kind 'attn' with window 5 .*mlp/w5"):
        tracing_effects(traces, kind="attn")
    with pytest.raises(TracekitError, match="unknown reduce"):
        tracing_effects(traces, reduce="mean")
    edits = pd.DataFrame({"model": "m", "dataset": "cf", "case_id": [0, 1, 7], "method": "rome",
                          "problem": "error-injection", "layer": [1, 0, 0], "rewrite": [0.5, 0.6, 0.7]})
    joined = join_edits(edits, tracing_effects(traces))
    assert joined["tracing_effect"].tolist() == [0.9, 0.3] and joined["case_id"].tolist() == [0, 1]
    with pytest.raises(TracekitError, match="no successful edit results"):
        join_edits(edits.head(0), tracing_effects(traces))
    with pytest.raises(TracekitError, match="no edit result has a trace"):
        join_edits(edits.assign(dataset="zsre"), tracing_effects(traces))
    with pytest.raises(TracekitError, match="no results with method=memit"):
        select(joined, method="memit")


def test_effect_by_layer_means():
    table = effect_by_layer(traces_long({0: [0.1, 0.9], 1: [0.3, 0.2], 2: [0.2, 0.4]}))
    assert table["mean"].tolist() == pytest.approx([0.2, 0.5])
    assert table["sem"].tolist() == pytest.approx([0.1 / np.sqrt(3), np.std([0.9, 0.2, 0.4], ddof=1) / np.sqrt(3)])
    with pytest.raises(TracekitError, match="no traces"):
        effect_by_layer(traces_long({}))
