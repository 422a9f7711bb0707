"""``tracekit analyse``: the paper's analyses from result stores (``recipes/analyse.py`` is a thin
script over this module; the analyses themselves are ``tracekit.analysis``)."""

from __future__ import annotations

import argparse

from tracekit.cli.common import console
from tracekit.errors import TracekitError

# Parsers are built for `tracekit --help`: pandas, the store and the analyses load when the command runs.

ANALYSE_HELP = """The paper's analyses from a result store: tables (Markdown + CSV) and figures (PNG).

    tracekit analyse --store runs/smollm.sqlite --out docs/replication

Writes: tracing effect by layer (Fig. 1/2), edit scores by layer (Fig. 7), rewrite score vs
tracing effect at the default layer with Pearson rho and p (Fig. 4), R^2 of tracing-only /
layer-only / layer x tracing models (Table 1) for every problem x method with nested F-tests
(Fig. 6, Table 3; beside each F-test's p, f_p_permuted is the p-value when whole points, not
(point, layer) rows, are exchangeable), paraphrase / neighborhood / overall outcomes (Tables 4-6), per-layer
correlations (Fig. 15), the concentrated-effects subset (Table 2), and robustness variants
(window 10, last subject token, representation zeroing) where the store has those traces.

Beyond the paper, every R^2 table carries what qualifies it: added_share (the added R^2 as a
share of what layer leaves, 1 - R^2 of layer), added_chance (the 95th percentile of added R^2
with whole points' tracing profiles shuffled: the chance level), at_ceiling / at_floor (share of
scores >= 0.98 / <= 0.02) and degenerate_layers (layers where every point scores the same; a
table without them is written too). Also: the practical check (each point edited at its
peak-tracing layer vs one fixed layer), the essence score and Meng et al.'s unscaled metrics as
outcomes, the concentrated points' peak layers, and table3_r2_rewrite_given_probabilities: the
R^2 tracing adds once each point's log p(o_true), clean and with the subject noised (from its
trace), has a slope per layer in both models (the tracing effect is a share of p_clean - p_noise,
and those numbers may also make a fact easier or harder to edit).

With --by-relation, Fig. 4 and Table 3 are also split by the facts' relation, and the added-R^2
test of every outcome (Tables 3-6, essence, the unscaled metrics) is controlled for it (relation
x layer intercepts, points shuffled within relation). cells_rewrite is one row per (problem,
method): the added R^2 beside its chance level, the relation-controlled test, the paper's figure,
a verdict, and the verdict's p-value adjusted for the number of cells (p_holm, Holm's method: of
20 cells with no effect, at least one passes p < 0.05 by chance in two studies of three).
"""


def add_analyse_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, nargs="+",
                        help="result store(s); several are read together (shards need no merge for analysis)")
    parser.add_argument("--out", default="analysis", help="output folder; default: %(default)s")
    parser.add_argument("--kind", default="mlp", help="localisation: mlp, attn, resid or zero; default: %(default)s")
    parser.add_argument("--window", type=int, default=5, help="tracing window to use; default: %(default)s")
    parser.add_argument("--reduce", default="max", choices=["max", "last_subject"],
                        help="effect per layer: max over tokens (paper) or at the last subject token")
    parser.add_argument("--default-layer", type=int, default=None,
                        help="layer for Fig. 4 (default: from the edit sweep's manifest, else ROME's best layer)")
    parser.add_argument("--no-robustness", dest="robustness", action="store_false", help="skip robustness tables")
    parser.add_argument("--by-relation", action="store_true",
                        help="also split Fig. 4 and Table 3 by the facts' relation (loads each stored dataset)")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="with --by-relation: dataset file or folder (default: $TRACEKIT_DATA, then ../shared/data)")
    parser.add_argument("--permutations", type=int, default=1999,
                        help="permutations for the points-shuffled p-values and chance levels (0: none; the "
                             "smallest p is 1 / (N + 1)); default: %(default)s")
    parser.add_argument("--problems", nargs="+", default=None, metavar="PROBLEM",
                        help="analyse only these editing problems' edits (default: every problem in the store; "
                             "e.g. one finished step of a sweep still running)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="analyse only these methods' edits (default: every method in the store)")
    parser.add_argument("--title", default=None,
                        help="heading of summary.md: say which dataset and model this is (default: tracekit analysis)")


def run(args) -> None:
    from tracekit.analysis import paper_analyses
    from tracekit.analysis.frames import relations_frame
    from tracekit.data.loaders import load_dataset
    from tracekit.store import ResultStore

    if args.permutations < 0:
        raise TracekitError(f"--permutations must be 0 or more, got {args.permutations}")
    traces, edits, default_layer = [], [], args.default_layer
    for path in args.store:
        with ResultStore(path, readonly=True) as store:
            traces.append(store.traces_frame())
            edits.append(store.edits_frame())
            manifest = store.manifests().get("edit")
            if default_layer is None and manifest is not None:
                default_layer = manifest["config"].get("default_layer")
    # A point stored in two of the given stores (a shard and its merge) counts once: the first store's.
    traces = stacked(traces).drop_duplicates(["model", "dataset", "case_id", "kind", "window", "layer"])
    edits = stacked(edits).drop_duplicates(["model", "dataset", "case_id", "method", "problem", "layer"])
    edits = only(edits, "problem", args.problems)
    edits = only(edits, "method", args.methods)
    relations = None
    if args.by_relation:
        relations = relations_frame({name: load_dataset(name, args.data) for name in sorted(set(edits["dataset"]))})
    summary = paper_analyses(traces, edits, args.out,
                             kind=args.kind, window=args.window, reduce=args.reduce, default_layer=default_layer,
                             robustness=args.robustness, relations=relations, permutations=args.permutations,
                             title=args.title, console=console)
    console.print(summary.markdown(), highlight=False)


def stacked(frames):
    """The stores' frames one under the other. A store without such results (an edits-only store
    beside one with the traces) adds nothing: its empty frame would turn every column to object."""
    import pandas as pd

    filled = [f for f in frames if len(f)]
    return pd.concat(filled, ignore_index=True) if filled else frames[0]


def only(edits, column: str, wanted):
    """The edits whose ``column`` is one of ``wanted`` (None: all); a name the store lacks is an error."""
    if wanted is None:
        return edits
    present = sorted(set(edits[column])) if column in edits else []
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise TracekitError(f"no edits with {column} {', '.join(missing)} in the store(s); they hold: "
                            f"{', '.join(present) or 'no edits'}")
    return edits[edits[column].isin(wanted)].reset_index(drop=True)


def register(sub) -> None:
    p = sub.add_parser("analyse", help="the paper's analyses (tables, figures, F-tests) from result stores",
                       description=ANALYSE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_analyse_args(p)
    p.set_defaults(func=run)
