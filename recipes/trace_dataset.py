#!/usr/bin/env python
"""Recipe 1: causal tracing (and representation zeroing) over a dataset, into a result store.

    python recipes/trace_dataset.py --model smollm2-135m --n 2000 --n-known 100 --kinds mlp --windows 5 \\
        --store runs/smollm.sqlite

Resumable: rerun the same command after an interruption and only missing traces are computed.
Sharded: --shard K/N (e.g. a Slurm array with --store runs/shard-{shard}.sqlite, then
`tracekit store merge runs/all.sqlite runs/shard-*.sqlite`).
"""

from __future__ import annotations

import argparse
import sys

from tracekit.cli import add_model_args, console, load_from_args
from tracekit.data.args import add_data_args, records_from_args
from tracekit.store.cli import add_store_args, open_store_from_args, run_recipe
from tracekit.store.studies import TRACE_KINDS, trace_study
from tracekit.store.sweep import print_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_data_args(parser)
    group = parser.add_argument_group("tracing")
    group.add_argument("--kinds", nargs="+", default=["mlp"], choices=TRACE_KINDS,
                       help="states to restore (zero = representation zeroing of MLP outputs); default: mlp")
    group.add_argument("--windows", nargs="+", type=int, default=[5],
                       help="window sizes (the paper: 5; ROME's figures: 10); default: 5")
    group.add_argument("--samples", type=int, default=10, help="noise samples per point; default: %(default)s")
    group.add_argument("--noise", default="s3", help="noise rule: s3 (3 x embedding std), a float, or u<scale>")
    group.add_argument("--seed", type=int, default=0, help="noise seed (point i uses seed + case id)")
    add_store_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args, *, trace_fn=None, zero_fn=None) -> None:
    model = load_from_args(args)
    store, shard = open_store_from_args(args)
    with store:
        records = records_from_args(args, model, cache=store, shard=shard, console=console)
        report = trace_study(model, records, store, kinds=args.kinds, windows=args.windows, samples=args.samples,
                             noise=args.noise, seed=args.seed, shard=shard, trace_fn=trace_fn, zero_fn=zero_fn,
                             progress=not args.quiet)
        print_report(report, store, console)


def main(argv=None, **inject) -> int:
    return run_recipe(lambda: run(build_parser().parse_args(argv), **inject))


if __name__ == "__main__":
    sys.exit(main())
