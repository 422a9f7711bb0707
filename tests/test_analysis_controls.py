"""The checks beyond the paper: each finds an effect planted in synthetic data and none where none
is planted (added R^2 share and chance level, relation-controlled test, ceiling / degenerate-layer
flags, the peak-layer practical check)."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from tracekit import TracekitError
from tracekit.analysis import (degenerate_layers, fit_r2, fit_r2_within, outcome_flags, peak_layer_check,
                               profile_permutation, r2_grid)

LAYER_MEANS = np.linspace(0.0, 1.0, 8)


def sweep(n_points, beta, seed, *, relation_shift=0.0, point_sd=0.2, noise=0.1):
    """Each point edited at all 8 layers. Two relations (half the points each); ``relation_shift``
    raises both the tracing effect and the score of relation "B" (a confound with no within-relation
    link); ``beta`` is the planted within-point effect of tracing on the score."""
    rng = np.random.default_rng(seed)
    relation = np.where(np.arange(n_points) < n_points // 2, "A", "B")
    shift = np.where(relation == "B", relation_shift, 0.0)
    point = np.repeat(np.arange(n_points), len(LAYER_MEANS))
    layer = np.tile(np.arange(len(LAYER_MEANS)), n_points)
    tracing = (rng.uniform(0, 1, n_points) + shift)[point] + rng.normal(0, 0.05, len(point))
    score = (LAYER_MEANS[layer] + beta * tracing + shift[point] + rng.normal(0, point_sd, n_points)[point]
             + rng.normal(0, noise, len(point)))
    return pd.DataFrame({"case_id": point, "layer": layer, "relation": relation[point], "tracing_effect": tracing,
                         "rewrite": score})


def test_added_share_is_added_over_what_layer_leaves():
    fit = fit_r2(sweep(200, beta=0.6, seed=0, point_sd=0.0, noise=0.2), "rewrite", permutations=99)
    assert fit.added_share == pytest.approx(fit.added / (1 - fit.r2_layer), rel=1e-12)
    var_tracing, var_noise = 0.6 ** 2 / 12, 0.2 ** 2  # tracing's share of the variance layer does not explain
    assert fit.added_share == pytest.approx(var_tracing / (var_tracing + var_noise), abs=0.04)
    null = fit_r2(sweep(200, beta=0.0, seed=0, point_sd=0.0, noise=0.2), "rewrite", permutations=99)
    assert 0 <= null.added_share < 0.01


def test_chance_level_bounds_added_r2_under_no_effect_and_a_planted_effect_clears_it():
    exceed = []
    for seed in range(40):
        test = profile_permutation(sweep(40, beta=0.0, seed=seed), permutations=199, seed=seed)
        exceed.append(test.added > test.chance)
        assert test.points == 40 and len(test.null) == 199 and (test.null >= 0).all()
    assert np.mean(exceed) <= 0.15  # about 5% of null datasets exceed the 95th percentile
    planted = fit_r2(sweep(40, beta=0.6, seed=0), "rewrite", permutations=199)
    assert planted.added > 3 * planted.added_chance and planted.f_p_permuted <= 0.01
    # fewer points give a higher chance level: 100 facts are not enough to see a 0.001 effect
    small = profile_permutation(sweep(20, beta=0.0, seed=1), permutations=199).chance
    large = profile_permutation(sweep(200, beta=0.0, seed=1), permutations=199).chance
    assert small > 3 * large


def test_observed_added_r2_of_the_permutation_test_equals_the_regression():
    data = sweep(30, beta=0.3, seed=2)
    assert profile_permutation(data, permutations=9).added == pytest.approx(fit_r2(data, permutations=0).added,
                                                                           abs=1e-10)
    assert profile_permutation(data, within="relation", permutations=9).added == pytest.approx(
        fit_r2_within(data, permutations=0).added, abs=1e-10)


def test_relation_controlled_test_hand_computed():
    data = sweep(30, beta=0.3, seed=3)
    y = data["rewrite"].to_numpy()
    cells = pd.get_dummies(data["relation"] + "/" + data["layer"].astype(str)).to_numpy(float)
    slopes = pd.get_dummies(data["layer"]).to_numpy(float) * data["tracing_effect"].to_numpy()[:, None]

    def r2(X):
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        return 1 - ((y - X @ coef) ** 2).sum() / ((y - y.mean()) ** 2).sum()

    fit = fit_r2_within(data, permutations=0)
    assert (fit.n, fit.groups) == (240, 2)
    assert fit.r2_control_layer == pytest.approx(r2(cells), abs=1e-10)
    assert fit.r2_control_layer_x_tracing == pytest.approx(r2(np.column_stack([cells, slopes])), abs=1e-10)
    assert np.isnan(fit.p_permuted)
    with pytest.raises(TracekitError, match="no 'topic' column"):
        fit_r2_within(data, control="topic")


def test_relation_controlled_test_removes_a_confound_and_keeps_a_real_effect():
    pooled_p, within_p = [], []
    for seed in range(30):
        data = sweep(40, beta=0.0, seed=seed, relation_shift=1.0)  # relation raises tracing and score alike
        pooled_p.append(fit_r2(data, permutations=199).f_p_permuted)
        within_p.append(fit_r2_within(data, permutations=199).p_permuted)
    assert np.mean(np.array(pooled_p) < 0.05) > 0.8  # the pooled test sees the confound as an effect
    assert np.mean(np.array(within_p) < 0.05) <= 0.15  # controlled, it holds its level ...
    assert sps.kstest(within_p, "uniform").pvalue > 0.01
    planted = fit_r2_within(sweep(40, beta=0.6, seed=0, relation_shift=1.0), permutations=199)
    assert planted.p_permuted <= 0.01 and planted.added > 2 * planted.added_chance  # ... and finds a real effect


def test_shuffles_stay_within_relation():
    data = sweep(20, beta=0.0, seed=4)
    one_relation = data.assign(relation="A")
    assert profile_permutation(one_relation, within="relation") is None  # nothing to control for
    assert np.isnan(fit_r2_within(one_relation, permutations=99).p_permuted)
    # a profile that only says which relation a point is in carries nothing once shuffled within relation
    by_relation = data.assign(tracing_effect=(data["relation"] == "B") + 0.01 * data["layer"])
    assert profile_permutation(by_relation, within="relation", permutations=99).p == 1.0


def test_ceiling_floor_and_degenerate_flags():
    data = sweep(30, beta=0.3, seed=5)
    assert degenerate_layers(data) == [] and outcome_flags(data)["degenerate_layers"] == ""
    data.loc[data["layer"] == 7, "rewrite"] = 0.0  # an editor that cannot work at the last layer
    near = data.assign(rewrite=np.where(data["layer"] == 0, 0.99 + 0.001 * (data["case_id"] % 10), data["rewrite"]))
    assert degenerate_layers(near) == [0, 7]  # within about 0.01 of the same score counts ...
    wide = data.assign(rewrite=np.where(data["layer"] == 0, 0.9 + 0.01 * (data["case_id"] % 10), data["rewrite"]))
    assert degenerate_layers(wide) == [7]  # ... a spread of a few points does not
    data.loc[data["layer"] == 0, "rewrite"] = 0.99  # every point at the ceiling
    flags = outcome_flags(data)
    assert degenerate_layers(data) == [0, 7] and flags["degenerate_layers"] == "0 7"
    assert flags["at_ceiling"] == pytest.approx(((data["rewrite"] >= 0.98).sum()) / len(data))
    assert flags["at_floor"] == pytest.approx(((data["rewrite"] <= 0.02).sum()) / len(data))
    grid = r2_grid(data.assign(problem="p", method="m"), permutations=0)
    dropped = r2_grid(data.assign(problem="p", method="m"), drop_degenerate=True, permutations=0)
    assert grid["degenerate_layers"].tolist() == dropped["degenerate_layers"].tolist() == ["0 7"]
    assert (grid["n"].item(), dropped["n"].item()) == (240, 180)
    # the degenerate layers inflate layer's R^2; the share of what layer leaves does not depend on them
    assert grid["r2_layer"].item() > dropped["r2_layer"].item()
    assert grid["added_share"].item() == pytest.approx(dropped["added_share"].item(), rel=1e-6)


def test_peak_layer_check_hand_computed():
    rows = [(case, layer, effect, score) for case, effects, scores in (
        (0, [0.9, 0.1, 0.2], [0.5, 0.9, 0.7]),  # peak at layer 0
        (1, [0.1, 0.8, 0.2], [0.6, 0.8, 0.7]),  # peak at layer 1
        (2, [0.1, 0.2, 0.7], [0.4, 0.9, 1.0]),  # peak at layer 2
    ) for layer, (effect, score) in enumerate(zip(effects, scores))]
    joined = pd.DataFrame(rows, columns=["case_id", "layer", "tracing_effect", "rewrite"]).assign(problem="p", method="m")
    best = peak_layer_check(joined).iloc[0]
    assert best["fixed_layer"] == 1 and best["points"] == 3  # layer 1 has the best mean (0.867)
    assert best["at_peak"] == pytest.approx((0.5 + 0.8 + 1.0) / 3) and best["at_fixed"] == pytest.approx(2.6 / 3)
    assert best["oracle"] == pytest.approx((0.9 + 0.8 + 1.0) / 3) and best["peak_layers"] == "0:1 1:1 2:1"
    assert peak_layer_check(joined, fixed_layer=0).iloc[0]["at_fixed"] == pytest.approx(0.5)
    with pytest.raises(TracekitError, match="layer 5 was not edited"):
        peak_layer_check(joined, fixed_layer=5)
    other = joined[joined["layer"] != 1].assign(method="m2")  # a cell edited at layers 0 and 2 only
    both = peak_layer_check(pd.concat([joined, other]), fixed_layer=1)
    assert both["method"].tolist() == ["m"]  # the cell without the fixed layer is left out


def peaked_sweep(n_points, gain, seed):
    """Tracing peaks at a random layer per point; editing there gains ``gain`` over the layer's mean."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in range(n_points):
        peak = rng.integers(0, 8)
        for layer in range(8):
            effect = np.exp(-0.5 * (layer - peak) ** 2) + 0.01 * rng.random()
            score = 0.5 + gain * (layer == peak) + rng.normal(0, 0.1)
            rows.append((case, layer, effect, score))
    return pd.DataFrame(rows, columns=["case_id", "layer", "tracing_effect", "rewrite"]).assign(problem="p", method="m")


def test_peak_layer_check_finds_a_planted_gain_and_none_where_none_is_planted():
    planted = peak_layer_check(peaked_sweep(60, gain=0.3, seed=0), fixed_layer=7).iloc[0]
    assert planted["peak_minus_fixed"] > 0.1 and planted["p"] < 1e-6
    p_values = [peak_layer_check(peaked_sweep(60, gain=0.0, seed=s), fixed_layer=3).iloc[0]["p"] for s in range(30)]
    assert np.mean(np.array(p_values) < 0.05) <= 0.2


def confounded_sweep(n_points, beta, seed):
    """A per-point covariate z (say log p(o_true) under the noise) raises the tracing effect and,
    with a slope that differs by layer, the score; ``beta`` is tracing's own planted effect."""
    data = sweep(n_points, beta=0.0, seed=seed, point_sd=0.05)
    rng = np.random.default_rng(seed + 1000)
    z = rng.normal(0, 1, n_points)
    own = rng.uniform(0, 1, n_points)  # the part of the tracing effect that z does not set
    point, layer = data["case_id"].to_numpy(), data["layer"].to_numpy()
    tracing = 0.5 * z[point] + own[point] + rng.normal(0, 0.05, len(point))
    score = data["rewrite"] + np.linspace(0.2, 1.0, len(LAYER_MEANS))[layer] * z[point] + beta * own[point]
    return data.assign(z=z[point], tracing_effect=tracing, rewrite=score)


def test_covariate_controlled_test_hand_computed():
    data = confounded_sweep(30, beta=0.3, seed=5)
    y = data["rewrite"].to_numpy()
    by_layer = pd.get_dummies(data["layer"]).to_numpy(float)
    base = np.column_stack([by_layer, by_layer * data["z"].to_numpy()[:, None]])
    slopes = by_layer * data["tracing_effect"].to_numpy()[:, None]

    def r2(X):
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        return 1 - ((y - X @ coef) ** 2).sum() / ((y - y.mean()) ** 2).sum()

    fit = fit_r2_within(data, control=None, covariates=("z",), permutations=0)
    assert (fit.n, fit.groups) == (240, 1)
    assert fit.r2_control_layer == pytest.approx(r2(base), abs=1e-10)
    assert fit.r2_control_layer_x_tracing == pytest.approx(r2(np.column_stack([base, slopes])), abs=1e-10)
    # the closed-form permutation statistic is the same regression, with and without relation intercepts
    for control in (None, "relation"):
        assert profile_permutation(data, within=control, covariates=("z",), permutations=9).added == pytest.approx(
            fit_r2_within(data, control=control, covariates=("z",), permutations=0).added, abs=1e-10)
    # a covariate that is constant adds nothing: the same fit as none
    constant = fit_r2_within(data.assign(z=1.0), control="relation", covariates=("z",), permutations=19)
    plain = fit_r2_within(data, control="relation", permutations=19)
    assert (constant.added, constant.p_permuted) == pytest.approx((plain.added, plain.p_permuted), abs=1e-10)
    with pytest.raises(TracekitError, match="no 'p_noise' column"):
        fit_r2_within(data, control=None, covariates=("p_noise",))


def test_covariate_control_removes_a_confound_and_keeps_a_real_effect():
    pooled_p, given_p = [], []
    for seed in range(30):
        data = confounded_sweep(40, beta=0.0, seed=seed)  # z raises tracing and score alike
        pooled_p.append(fit_r2(data, permutations=199).f_p_permuted)
        given_p.append(fit_r2_within(data, control=None, covariates=("z",), permutations=199).p_permuted)
    assert np.mean(np.array(pooled_p) < 0.05) > 0.8  # the plain test sees the confound as an effect
    assert np.mean(np.array(given_p) < 0.05) <= 0.15  # controlled, it holds its level ...
    assert sps.kstest(given_p, "uniform").pvalue > 0.01
    planted = fit_r2_within(confounded_sweep(40, beta=0.6, seed=0), control=None, covariates=("z",),
                            permutations=199)
    assert planted.p_permuted <= 0.01 and planted.added > 2 * planted.added_chance  # ... and finds a real effect
