"""Command-line options for choosing points, shared by the recipes: dataset, n, known-fact filter."""

from __future__ import annotations

import argparse

from rich.console import Console

from tracekit.data.known import KNOWN_NEW_TOKENS, filter_known
from tracekit.data.loaders import BUILTIN_DATASETS, load_dataset
from tracekit.data.locate import DATASETS
from tracekit.data.records import FactRecord


def add_data_args(parser: argparse.ArgumentParser, default_n: int | None = None) -> None:
    group = parser.add_argument_group("points")
    group.add_argument("--dataset", default="counterfact", choices=sorted([*DATASETS, *BUILTIN_DATASETS]),
                       help="dataset format (worldfacts: built-in facts, no file); default: %(default)s")
    group.add_argument("--data", metavar="PATH", default=None,
                       help="dataset file or its folder (default: $TRACEKIT_DATA, then ../shared/data)")
    group.add_argument("--download", action="store_true",
                       help="fetch the public copy (ROME's rome.baulab.info) if no local file is found")
    group.add_argument("--n", type=int, default=default_n,
                       help="use the first N records of the dataset (the paper: 2000 of CounterFact); "
                            "default: all")
    group.add_argument("--no-known-filter", dest="known_filter", action="store_false",
                       help="keep every record (default: only points whose greedy continuation of "
                            f"{KNOWN_NEW_TOKENS} tokens contains o_true, as in the paper)")
    group.add_argument("--n-known", type=int, default=None, metavar="K",
                       help="stop at the first K known points (in dataset order)")


def records_from_args(args, model, cache=None, shard=None, console: Console | None = None) -> list[FactRecord]:
    """The points a recipe works on: loaded, cut to --n, known-filtered (verdicts cached in ``cache``).

    With a shard and no --n-known, only this shard's points are filtered (a point's shard is
    fixed by its case id); --n-known needs the dataset order, so every shard filters up to K
    points itself, reusing any verdicts already cached.
    """
    records = load_dataset(args.dataset, args.data, args.n, download=args.download)
    loaded = len(records)
    if shard is not None and args.n_known is None:
        records = [r for r in records if shard.owns(r.case_id)]
    if args.known_filter:
        records = filter_known(model, records, limit=args.n_known, cache=cache)
    elif args.n_known is not None:
        records = records[:args.n_known]
    if console is not None:
        what = "known " if args.known_filter else ""
        console.print(f"{len(records)} {what}points of {loaded} {args.dataset} records"
                      + (f" (shard {shard})" if shard is not None else ""), highlight=False)
    return records
