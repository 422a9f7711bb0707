#!/usr/bin/env python
"""Recipe 2: the editing sweep (methods x problems x layers) over a dataset, into a result store.

    python recipes/edit_sweep.py --model smollm2-135m --n 2000 --n-known 100 \\
        --methods rome ft-1 --problems error-injection fact-forcing --layers auto --store runs/smollm.sqlite

The same as `tracekit edit-sweep` (tracekit/cli/studies.py). --layers auto: about 8 layers
spread from first to last plus the default (ROME preset) layer, as the paper did for GPT-J.
Every edit result is stored the moment it is scored; rerun to resume; --shard K/N to split
the work over a scheduler's jobs (see recipes/trace_dataset.py), --shard shared for processes
side by side on one store, --executor ray to spread it over a Ray cluster (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import sys

from tracekit.store.cli import run_recipe
from tracekit.cli.studies import add_edit_args, run_edit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_edit_args(parser)
    return parser


def main(argv=None, **inject) -> int:
    return run_recipe(lambda: run_edit(build_parser().parse_args(argv), **inject))


if __name__ == "__main__":
    sys.exit(main())
