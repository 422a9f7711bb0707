#!/usr/bin/env python
"""Recipe 1: causal tracing (and representation zeroing) over a dataset, into a result store.

    python recipes/trace_dataset.py --model smollm2-135m --n 2000 --n-known 100 --kinds mlp --windows 5 \\
        --store runs/smollm.sqlite

The same as `tracekit trace-dataset` (tracekit/cli/studies.py). Resumable: rerun the same
command after an interruption and only missing traces are computed. Sharded: --shard K/N
(e.g. a Slurm array with --store runs/shard-{shard}.sqlite, then `tracekit store merge
runs/all.sqlite runs/shard-*.sqlite`), or --shard shared for processes side by side on one
machine and one store. On a Ray cluster: --executor ray (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import sys

from tracekit.store.cli import run_recipe
from tracekit.cli.studies import add_trace_args, run_trace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trace_args(parser)
    return parser


def main(argv=None, **inject) -> int:
    return run_recipe(lambda: run_trace(build_parser().parse_args(argv), **inject))


if __name__ == "__main__":
    sys.exit(main())
