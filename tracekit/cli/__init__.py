"""The ``tracekit`` command line: one module per area, each with ``register(subparsers)``.

A command's parser sets ``func`` to a callable taking the parsed args. Errors of tracekit's
own (bad input) print one line. Building the parsers imports nothing heavy (no torch), so
``tracekit --help`` answers at once; a command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from tracekit.cli import analysis, demo, editing, models, store, studies, tracing
from tracekit.cli.common import add_model_args, console, load_from_args, run_reporting_errors

AREAS = (models, tracing, editing, store, studies, analysis, demo)  # the order of `tracekit --help`

__all__ = ["add_model_args", "build_parser", "console", "load_from_args", "main", "run_reporting_errors"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracekit",
        description="Causal tracing and weight editing for language models "
                    "(reproducing 'Does Localization Inform Editing?').",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in AREAS:
        area.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
