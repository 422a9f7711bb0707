#!/usr/bin/env python
"""Recipe 2: the editing sweep (methods x problems x layers) over a dataset, into a result store.

    python recipes/edit_sweep.py --model smollm2-135m --n 2000 --n-known 100 \\
        --methods rome ft-1 --problems error-injection fact-forcing --layers auto --store runs/smollm.sqlite

--layers auto: about 8 layers spread from first to last plus the default (ROME preset)
layer, as the paper did for GPT-J. Every edit result is stored the moment it is scored;
rerun to resume; --shard K/N to split the work (see recipes/trace_dataset.py).
"""

from __future__ import annotations

import argparse
import sys

from tracekit.cli import add_model_args, console, load_from_args
from tracekit.data.args import add_data_args, records_from_args
from tracekit.errors import TracekitError
from tracekit.store.cli import add_store_args, open_store_from_args, run_recipe
from tracekit.store.studies import edit_study, preset_layer, spread_layers
from tracekit.store.sweep import print_report

PROBLEMS = ("error-injection", "tracing-reversal", "fact-erasure", "fact-amplification", "fact-forcing")
METHODS = ("rome", "memit", "ft-1", "ft-5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_data_args(parser)
    group = parser.add_argument_group("editing")
    group.add_argument("--methods", nargs="+", default=["rome"], choices=METHODS, help="default: rome")
    group.add_argument("--problems", nargs="+", default=["error-injection"], choices=PROBLEMS,
                       help="default: error-injection")
    group.add_argument("--layers", nargs="+", default=["auto"],
                       help="0-based edit layers, or 'auto' (spread layers + the default layer); default: auto")
    group.add_argument("--spread", type=int, default=8, help="how many spread layers 'auto' takes; default: 8")
    group.add_argument("--default-layer", type=int, default=None,
                       help="the method's usual layer (default: the editing preset's ROME layer for the model); "
                            "hyperparameters come from the editing presets for each model, method and problem")
    group.add_argument("--seed", type=int, default=0, help="seed for noise (Fact Forcing, Tracing Reversal)")
    add_store_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def edit_layers(args, model) -> tuple[list[int], int | None]:
    default = args.default_layer if args.default_layer is not None else preset_layer(model)
    if args.layers == ["auto"]:
        return spread_layers(model.n_layers, args.spread, default), default
    try:
        return sorted({int(x) for x in args.layers}), default
    except ValueError:
        raise TracekitError(f"--layers takes integers or 'auto', got {' '.join(args.layers)}") from None


def run(args, *, edit_fn=None) -> None:
    model = load_from_args(args)
    layers, default = edit_layers(args, model)
    store, shard = open_store_from_args(args)
    with store:
        records = records_from_args(args, model, cache=store, shard=shard, console=console)
        console.print(f"edit layers {layers} (default layer {default})", highlight=False)
        report = edit_study(model, records, store, methods=args.methods, problems=args.problems, layers=layers,
                            default_layer=default, seed=args.seed, shard=shard,
                            edit_fn=edit_fn, progress=not args.quiet)
        print_report(report, store, console)


def main(argv=None, **inject) -> int:
    return run_recipe(lambda: run(build_parser().parse_args(argv), **inject))


if __name__ == "__main__":
    sys.exit(main())
