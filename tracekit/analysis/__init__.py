"""The paper's analyses over stored results (pandas in, tables and figures out).

    from tracekit.analysis import tracing_effects, join_edits, fit_r2, r2_grid, paper_analyses
    joined = join_edits(store.edits_frame(), tracing_effects(store.traces_frame(), kind="mlp", window=5))
    fit_r2(joined[joined.method == "rome"], "rewrite")   # R^2: tracing / layer / layer x tracing, F-test
    fit_r2_within(with_relation(joined, relations), "rewrite")  # the same, controlled for relation
    fit_r2_within(with_probabilities(joined, traces), control=None, covariates=PROBABILITIES)  # for p(o_true)
"""

from tracekit.analysis.checks import degenerate_layers, outcome_flags, peak_layer_check
from tracekit.analysis.frames import (PROBABILITIES, concentrated_cases, join_edits, only_points, relations_frame,
                                      select, tracing_effects, with_probabilities, with_relation)
from tracekit.analysis.paper import Summary, paper_analyses
from tracekit.analysis.report import save_table, to_markdown
from tracekit.analysis.permutation import PermutationTest, profile_permutation
from tracekit.analysis.stats import (R2Fit, WithinFit, correlations, effect_by_layer, fit_r2, fit_r2_within,
                                     holm, mean_scores_by_layer, pearson, r2_grid)

__all__ = ["PROBABILITIES", "PermutationTest", "R2Fit", "Summary", "WithinFit", "concentrated_cases", "correlations",
           "degenerate_layers", "effect_by_layer", "fit_r2", "fit_r2_within", "holm", "join_edits",
           "mean_scores_by_layer", "only_points", "outcome_flags", "paper_analyses", "peak_layer_check", "pearson",
           "profile_permutation", "r2_grid", "relations_frame", "save_table", "select", "to_markdown",
           "tracing_effects", "with_probabilities", "with_relation"]
