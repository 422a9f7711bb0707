#!/usr/bin/env python
"""Recipe 3: the paper's analyses from a result store: tables (Markdown + CSV) and figures (PNG).

    python recipes/analyse.py --store runs/smollm.sqlite --out docs/replication

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
outcomes, and the concentrated points' peak layers.

With --by-relation, Fig. 4 and Table 3 are also split by the facts' relation, and the added-R^2
test is controlled for it (relation x layer intercepts, points shuffled within relation).

The same as `tracekit analyse` (tracekit/cli/analysis.py).
"""

from __future__ import annotations

import argparse
import sys

from tracekit.cli.analysis import ANALYSE_HELP, add_analyse_args, run
from tracekit.store.cli import run_recipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=ANALYSE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_analyse_args(parser)
    return parser


def main(argv=None) -> int:
    return run_recipe(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
