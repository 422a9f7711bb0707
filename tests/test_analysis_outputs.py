"""paper_analyses: every table and figure from a store, and one-line errors when results are missing."""

import numpy as np
import pandas as pd
import pytest

from tracekit import TracekitError
from tracekit.analysis import fit_r2, holm, join_edits, paper_analyses, relations_frame, select, to_markdown, tracing_effects
from tracekit.analysis.frames import PROBABILITIES, with_probabilities, with_relation
from tracekit.analysis.stats import r2_grid
from tracekit.data import FactRecord
from tracekit.store import ResultStore

N_LAYERS, EDIT_LAYERS = 10, (0, 3, 6, 9)
PNG = b"\x89PNG\r\n\x1a\n"


def fill(store, n_points=40, seed=0, kinds=(("mlp", 5), ("mlp", 10), ("zero", 5))):
    """Traces peaked at a random layer; rewrite driven by layer, plus tracing for fact-forcing."""
    rng = np.random.default_rng(seed)
    layers = np.arange(N_LAYERS)
    for case in range(n_points):
        peak, width = rng.integers(0, N_LAYERS), rng.uniform(0.5, 3)
        profile = np.exp(-0.5 * ((layers - peak) / width) ** 2)
        for kind, window in kinds:
            # the probabilities vary by fact without drawing from rng (the planted numbers stay as they were)
            store.add_trace(model="m", dataset="counterfact", case_id=case, kind=kind, window=window,
                            p_clean=0.3 + 0.06 * (case % 10), p_noise=0.01 + 0.02 * (case * 7 % 10),
                            effect_max=profile * rng.uniform(0.5, 1), effect_last=profile * 0.5)
        for problem in ("error-injection", "fact-forcing"):
            for method in ("rome", "ft-1"):
                for layer in EDIT_LAYERS:
                    rewrite = 1 - layer / 12 + 0.05 * rng.normal() + (0.3 * profile[layer] if problem == "fact-forcing" else 0)
                    store.add_edit(model="m", dataset="counterfact", case_id=case, method=method, problem=problem,
                                   layer=layer, scores={"rewrite": rewrite, "paraphrase": rewrite * 0.7,
                                                        "neighborhood": 0.9 - 0.1 * rng.random(),
                                                        "overall": rewrite * 0.6 + 0.3,
                                                        "essence": 0.8 + 0.1 * rng.random(),
                                                        "efficacy_success": float(rewrite > 0.5),
                                                        "efficacy_magnitude": rewrite - 0.5})


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s.sqlite"
    with ResultStore(path) as store:
        fill(store)
        return store.traces_frame(), store.edits_frame()


def test_every_output_is_written(frames, tmp_path):
    traces, edits = frames
    summary = paper_analyses(traces, edits, tmp_path, default_layer=3)
    names = {p.name for p in summary.outputs}
    for table in ("fig1_effect_by_layer", "fig7_scores_by_layer", "fig4_correlation", "table1_r2", "table3_r2_rewrite",
                  "table4_r2_paraphrase", "table5_r2_neighborhood", "table6_r2_overall", "fig15_correlation_by_layer",
                  "table2_concentrated", "robustness_window10", "robustness_last_subject", "robustness_zeroing",
                  "robustness_zeroing_correlation_by_layer", "table2_concentrated_points", "practical_peak_vs_fixed_layer",
                  "fig8_essence_and_unscaled_by_layer", "fig14_r2_essence_and_unscaled",
                  "table3_r2_rewrite_given_probabilities"):
        assert {f"{table}.md", f"{table}.csv"} <= names, table
    for figure in ("fig1_effect_by_layer", "fig4_rome_error-injection", "fig4_ft-1_fact-forcing", "fig6_r2_rewrite",
                   "fig15_correlation_by_layer"):
        assert (tmp_path / f"{figure}.png").read_bytes()[:8] == PNG
    assert all(p.exists() for p in summary.outputs) and "summary.md" in names
    assert summary.headline["default layer"] == 3 and not summary.notes

    joined = join_edits(edits, tracing_effects(traces, kind="mlp", window=5))
    expected = fit_r2(select(joined, problem="error-injection", method="rome"), "rewrite")
    table1 = pd.read_csv(tmp_path / "table1_r2.csv")
    assert table1["R2"].tolist() == pytest.approx([expected.r2_tracing, expected.r2_layer, expected.r2_layer_x_tracing])
    grid = pd.read_csv(tmp_path / "table3_r2_rewrite.csv")
    forcing = grid[grid["problem"] == "fact-forcing"]
    assert (forcing["f_p"] < 1e-6).all() and (forcing["added"] > 0.02).all()  # the planted effect is found
    corr = pd.read_csv(tmp_path / "fig4_correlation.csv")
    cell = select(joined, problem="fact-forcing", method="rome", layer=3)
    rho = np.corrcoef(cell["tracing_effect"], cell["rewrite"])[0, 1]
    assert corr.set_index(["problem", "method"]).loc[("fact-forcing", "rome"), "rho"] == pytest.approx(rho)
    effect = pd.read_csv(tmp_path / "fig1_effect_by_layer.csv")
    assert set(zip(effect["kind"], effect["window"])) == {("mlp", 5), ("mlp", 10), ("zero", 5)}
    for column in ("added_share", "added_chance", "at_ceiling", "at_floor", "degenerate_layers"):
        assert column in grid.columns  # every R^2 table says what qualifies it
    assert (forcing["added"] > forcing["added_chance"]).all()
    fig14 = pd.read_csv(tmp_path / "fig14_r2_essence_and_unscaled.csv")
    assert set(fig14["outcome"]) == {"essence", "efficacy_success", "efficacy_magnitude"}
    practical = pd.read_csv(tmp_path / "practical_peak_vs_fixed_layer.csv")
    assert set(practical["fixed"]) == {"default layer", "best layer on average"}
    assert (practical.loc[practical["fixed"] == "default layer", "fixed_layer"] == 3).all()
    assert "data" in summary.headline and "counterfact (40 points)" in summary.headline["data"]
    text = (tmp_path / "summary.md").read_text()  # the paper's figure beside ours, where its text gives one
    assert "- table 1 (rome, error-injection): tracing " in text and "(paper, GPT-J: layer 0.947, layer x tracing 0.948" in text
    assert "(paper, GPT-J: 0.032, Fact Forcing with FT" in text
    markdown = (tmp_path / "table1_r2.md").read_text()
    assert markdown.startswith("### R² for rewrite score, rome / error-injection") and "| layer x tracing |" in markdown


def test_missing_robustness_traces_are_noted_not_fatal(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        fill(store, n_points=20, kinds=(("mlp", 5),))
        summary = paper_analyses(store.traces_frame(), store.edits_frame(), tmp_path / "out")
    assert any("window 10" in note for note in summary.notes) and any("zeroing" in note for note in summary.notes)
    assert (tmp_path / "out" / "table3_r2_rewrite.csv").exists()


def test_no_matching_results_is_a_one_line_error(frames, tmp_path):
    traces, edits = frames
    with pytest.raises(TracekitError, match="no traces of kind 'attn' with window 5") as err:
        paper_analyses(traces, edits, tmp_path, kind="attn")
    assert "\n" not in str(err.value)
    with pytest.raises(TracekitError, match="no results with layer=4"):
        paper_analyses(traces, edits, tmp_path, default_layer=4)
    with pytest.raises(TracekitError, match="the store has no traces"):
        paper_analyses(traces.head(0), edits, tmp_path)
    summary = paper_analyses(traces, edits.head(0), tmp_path / "traces-only")
    assert summary.notes == ["no edit results in the store: only the tracing figures were made"]


def test_markdown_format():
    df = pd.DataFrame({"method": ["rome"], "r2": [0.94712], "p": [3.2e-7], "n": [652]})
    assert to_markdown(df).splitlines() == ["| method | r2 | p | n |", "| --- | ---: | ---: | ---: |",
                                            "| rome | 0.947 | 3.20e-07 | 652 |"]


def test_split_by_relation(frames, tmp_path):
    traces, edits = frames
    records = [FactRecord(case_id=case, prompt="{} is in", subject="s", target_true=" a", target_new=" b",
                          relation_id="P17" if case % 2 else "P37") for case in range(40)]
    relations = relations_frame({"counterfact": records})
    paper_analyses(traces, edits, tmp_path, default_layer=3, robustness=False, relations=relations)
    grid = pd.read_csv(tmp_path / "table3_r2_rewrite_by_relation.csv")
    assert set(zip(grid["relation"], grid["problem"], grid["method"])) == {
        (r, p, m) for r in ("P17", "P37") for p in ("error-injection", "fact-forcing") for m in ("rome", "ft-1")}
    assert (grid["n"] == 20 * len(EDIT_LAYERS)).all()
    joined = join_edits(edits, tracing_effects(traces, kind="mlp", window=5))
    odd = select(joined[joined["case_id"] % 2 == 1], problem="fact-forcing", method="ft-1", layer=3)
    corr = pd.read_csv(tmp_path / "fig4_correlation_by_relation.csv").set_index(["relation", "problem", "method"])
    assert corr.loc[("P17", "fact-forcing", "ft-1"), "rho"] == pytest.approx(
        np.corrcoef(odd["tracing_effect"], odd["rewrite"])[0, 1])
    within = pd.read_csv(tmp_path / "table3_r2_rewrite_within_relation.csv")
    assert (within["groups"] == 2).all() and {"added_pooled", "p_facts_pooled", "p_permuted"} <= set(within.columns)

    for name in ("table4_r2_paraphrase", "table5_r2_neighborhood", "table6_r2_overall"):
        other = pd.read_csv(tmp_path / f"{name}_within_relation.csv")
        assert len(other) == 4 and (other["groups"] == 2).all()
    assert (tmp_path / "table3_r2_rewrite_by_relation_without_degenerate.csv").exists()
    essence = pd.read_csv(tmp_path / "fig14_r2_essence_and_unscaled_within_relation.csv")
    pooled = pd.read_csv(tmp_path / "fig14_r2_essence_and_unscaled.csv")
    assert set(essence["outcome"]) == {"essence", "efficacy_success", "efficacy_magnitude"} and (essence["groups"] == 2).all()
    keys = ["outcome", "problem", "method"]
    both = essence.merge(pooled, on=keys, suffixes=("", "_grid"))
    assert len(both) == len(essence) == 12 and both["added_pooled"].to_list() == pytest.approx(both["added_grid"].to_list())
    for _, family in essence.groupby("problem"):  # Holm over one problem's outcomes x methods
        assert family["p_holm"].to_list() == pytest.approx(holm(family["p_permuted"]).tolist())
    given = pd.read_csv(tmp_path / "table3_r2_rewrite_given_probabilities.csv")
    assert {"added", "p_permuted", "added_in_relation", "p_permuted_in_relation", "p_holm"} <= set(given.columns)
    assert given["p_holm"].to_list() == pytest.approx(holm(given["p_permuted_in_relation"]).tolist())
    cells = pd.read_csv(tmp_path / "cells_rewrite.csv")
    assert {"added_in_relation", "p_in_relation", "chance_in_relation"} <= set(cells.columns)
    assert cells["added_in_relation"].to_list() == pytest.approx(within["added"].to_list())
    with pytest.raises(TracekitError, match=r"20 stored points have no record .*case 0\b"):
        paper_analyses(traces, edits, tmp_path, robustness=False, relations=relations[relations["case_id"] % 2 == 1])


def test_cell_table_puts_each_cell_beside_its_chance_level_and_the_paper(frames, tmp_path):
    traces, edits = frames
    summary = paper_analyses(traces, edits, tmp_path, default_layer=3, robustness=False, permutations=199)
    cells = pd.read_csv(tmp_path / "cells_rewrite.csv").set_index(["problem", "method"])
    assert len(cells) == 4 and (cells["points"] == 40).all() and (cells["n"] == 40 * len(EDIT_LAYERS)).all()
    planted = cells.loc[("fact-forcing", "ft-1")]  # tracing drives fact-forcing's rewrite score; not error injection's
    assert planted["added"] > 0.032 and planted["verdict"] == "above chance and above the paper's maximum"
    assert (cells.loc["error-injection", "verdict"] == "within chance").all()
    assert "0.947" in cells.loc[("error-injection", "rome"), "paper"]
    grid = pd.read_csv(tmp_path / "table3_r2_rewrite.csv").set_index(["problem", "method"])
    assert cells["added"].to_dict() == pytest.approx(grid["added"].to_dict())
    headline = summary.headline["cells where tracing adds R² above chance"]
    assert headline.startswith("2 of 4") and "; 2 after Holm's adjustment for 4 cells" in headline
    # Holm over 4 cells: each p at least the raw one, and the planted cells' (p 1/200) survive it
    assert (cells["p_holm"] >= cells["p_facts"] - 1e-12).all() and (cells["p_holm"] <= 1).all()
    assert (cells.loc["fact-forcing", "p_holm"] < 0.05).all()


def test_a_cell_at_the_floor_is_reported_not_fitted(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        fill(store, n_points=20, kinds=(("mlp", 5),))
        edits, traces = store.edits_frame(), store.traces_frame()
    floor = (edits["problem"] == "fact-forcing") & (edits["method"] == "rome")
    edits.loc[floor, "rewrite"] = 2e-8  # the paper code's floor: every edit failed
    summary = paper_analyses(traces, edits, tmp_path / "out", default_layer=3, robustness=False, permutations=99)
    cells = pd.read_csv(tmp_path / "out" / "cells_rewrite.csv").set_index(["problem", "method"])
    cell = cells.loc[("fact-forcing", "rome")]
    assert cell["verdict"] == "no fit" and cell["at_floor"] == 1.0 and np.isnan(cell["added"])
    assert cells.loc[("fact-forcing", "ft-1"), "verdict"] != "no fit"
    assert np.isnan(cell["p_holm"]) and cells["p_holm"].notna().sum() == 3  # a cell with no fit is no test
    headline = summary.headline["cells where tracing adds R² above chance"]
    assert "rome fact-forcing" not in headline  # the floor cell is not counted as "above chance"
    # the null cell that passes by luck at 20 points (rome error-injection here) does not pass Holm's adjustment
    assert headline.endswith("; 1 after Holm's adjustment for 3 cells: ft-1 fact-forcing")


def test_holm_adjusts_a_family_of_p_values():
    # by hand: sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> made monotone: 0.03, 0.06, 0.06
    adjusted = holm([0.04, 0.01, float("nan"), 0.03])
    assert adjusted[[1, 3, 0]].tolist() == pytest.approx([0.03, 0.06, 0.06]) and np.isnan(adjusted[2])
    assert holm([0.5, 0.9]).tolist() == pytest.approx([1.0, 1.0])  # capped at 1
    assert np.isnan(holm([float("nan")])).all() and holm([]).shape == (0,)


def test_verdicts():
    from tracekit.analysis.scrutiny import verdict

    assert verdict(0.01, 0.02, 0.3) == "within chance"
    assert verdict(0.03, 0.02, 0.01) == "above chance"
    assert verdict(0.05, 0.02, 0.001) == "above chance and above the paper's maximum"
    assert verdict(0.05, 0.02, 0.2) == "within chance"  # the facts-shuffled test decides too
    assert verdict(float("nan"), 0.02, 0.2) == "no fit"
    assert verdict(0.09, float("nan"), float("nan")) == "not tested"  # too few points to permute: no claim either way


def test_flags_name_ceiling_degenerate_layers_and_chance(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        fill(store, n_points=20, kinds=(("mlp", 5),))
        edits = store.edits_frame()
        traces = store.traces_frame()
    rome_last = (edits["method"] == "rome") & (edits["layer"] == 9)
    edits.loc[rome_last, "rewrite"] = 0.0  # ROME at the last layer: every point scores the same
    forcing = edits["problem"] == "fact-forcing"
    edits.loc[forcing, "rewrite"] = 0.99  # at the ceiling
    summary = paper_analyses(traces, edits, tmp_path / "out", default_layer=3, robustness=False, permutations=99,
                             title="synthetic data")
    text = (tmp_path / "out" / "summary.md").read_text()
    assert text.startswith("# synthetic data") and "## Flags" in text
    assert any("rome, error-injection: at layer(s) 9 every point scores the same" in f for f in summary.flags)
    assert any("ft-1, fact-forcing: 100% of rewrite scores are >= 0.98" in f for f in summary.flags)
    assert any("within chance" in f for f in summary.flags)  # error injection has no planted tracing effect
    dropped = pd.read_csv(tmp_path / "out" / "table3_r2_rewrite_without_degenerate.csv")
    rome = dropped[(dropped["method"] == "rome") & (dropped["problem"] == "error-injection")]
    assert rome["n"].item() == 20 * (len(EDIT_LAYERS) - 1)


def test_robustness_tables_are_relation_and_probability_controlled_too(frames, tmp_path):
    traces, edits = frames
    # zeroing's own p_noise differs: the probability control must still take the main (mlp, 5) traces'
    traces = traces.assign(p_noise=np.where(traces["kind"] == "zero", 0.5, traces["p_noise"]))
    records = [FactRecord(case_id=case, prompt="{} is in", subject="s", target_true=" a", target_new=" b",
                          relation_id="P17" if case % 2 else "P37") for case in range(40)]
    relations = relations_frame({"counterfact": records})
    summary = paper_analyses(traces, edits, tmp_path, default_layer=3, relations=relations, permutations=99)
    for name, label, kind, window, reduce in (("window10", "window 10", "mlp", 10, "max"),
                                              ("last_subject", "last subject token", "mlp", 5, "last_subject"),
                                              ("zeroing", "representation zeroing", "zero", 5, "max")):
        given = pd.read_csv(tmp_path / f"robustness_{name}_given_probabilities.csv")
        joined = join_edits(edits, tracing_effects(traces, kind=kind, window=window, reduce=reduce))
        split = with_relation(with_probabilities(joined, traces, kind="mlp", window=5), relations)
        expected = r2_grid(split, "rewrite", within="relation", covariates=PROBABILITIES, permutations=0)
        assert given["added_in_relation"].to_list() == pytest.approx(expected["added"].to_list(), abs=1e-12)
        assert given["p_holm"].to_list() == pytest.approx(holm(given["p_permuted_in_relation"]).tolist())
        assert f"robustness ({label}), given the facts' log p(o_true)" in summary.headline
        pooled = pd.read_csv(tmp_path / f"robustness_{name}.csv").set_index(["problem", "method"])
        within = pd.read_csv(tmp_path / f"robustness_{name}_within_relation.csv").set_index(["problem", "method"])
        assert (within["groups"] == 2).all()
        # the pooled columns are the pooled table's own numbers, not a refit with other permutations
        assert within["added_pooled"].to_dict() == pytest.approx(pooled.loc[within.index, "added"].to_dict())
        assert within["chance_pooled"].to_dict() == pytest.approx(pooled.loc[within.index, "added_chance"].to_dict())
        assert within["p_holm"].to_list() == pytest.approx(holm(within["p_permuted"]).tolist())
        passed = int((within["p_permuted"] < 0.05).sum())
        assert summary.headline[f"robustness ({label}), relation-controlled"].startswith(f"{passed} of 4 cells")


def test_probabilities_are_each_points_log_p_from_its_trace(frames):
    traces, edits = frames
    traces = traces.assign(p_noise=np.where(traces["case_id"] == 1, 0.0, traces["p_noise"]))  # underflowed
    joined = with_probabilities(join_edits(edits, tracing_effects(traces)), traces)
    assert len(joined) == len(edits) and set(PROBABILITIES) <= set(joined.columns)
    third = joined[joined["case_id"] == 3].iloc[0]  # p_clean 0.3 + 0.06 * 3, p_noise 0.01 + 0.02 * (21 % 10)
    assert (third["log_p_clean"], third["log_p_noise"]) == pytest.approx((np.log(0.48), np.log(0.03)))
    assert np.isfinite(joined.loc[joined["case_id"] == 1, "log_p_noise"]).all()  # a floor, not -inf
    with pytest.raises(TracekitError, match="no attn/w5 traces"):
        with_probabilities(joined, traces, kind="attn")
