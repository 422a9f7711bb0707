#!/usr/bin/env python
"""Recipe 3: the paper's analyses from result stores: tables (Markdown + CSV) and figures (PNG).

    python recipes/analyse.py --store runs/smollm.sqlite --out docs/replication

The same as `tracekit analyse` (tracekit/cli/analysis.py); `--help` lists what it writes.
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
