"""The ``tracekit`` command line. Each feature area registers its own subcommands.

A command module exposes ``register(subparsers)``; its parsers set ``func`` to a
callable taking the parsed args. Errors of tracekit's own (bad input) print one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rich.console import Console
from rich.table import Table

from tracekit.errors import TracekitError

COMMAND_MODULES = (
    "tracekit.cli",  # models, predict (below)
    "tracekit.tracing.cli",
    "tracekit.editing.cli",
    "tracekit.store.cli",
    "tracekit.studies.cli",  # trace-dataset, edit-sweep
    "tracekit.demo",
)

console = Console()


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model / --backend / --device / --dtype, shared by every model-loading command."""
    parser.add_argument("--model", default="smollm2-135m", help="model spec (see `tracekit models`); default: %(default)s")
    parser.add_argument("--backend", default="hf", choices=["hf", "transformer_lens", "nnsight"],
                        help="hook backend; default: %(default)s")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16; default: %(default)s")
    parser.add_argument("--bare-prompts", action="store_true",
                        help="do not put the spec's document-start token before prompts (smollm2-135m puts "
                             "<|endoftext|> there by default: its first position is an attention sink)")


def load_from_args(args):
    from tracekit import load_model

    with console.status(f"loading {args.model} ({args.backend})"):
        return load_model(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                          prepend_bos=False if getattr(args, "bare_prompts", False) else None)


def _models(args) -> None:
    from tracekit.models import list_specs

    table = Table(title="tracekit model specs")
    for column in ("spec", "what", "available here"):
        table.add_column(column)
    for info in list_specs():
        table.add_row(info.spec, info.what, "yes" if info.available else "no")
    console.print(table)


def _predict(args) -> None:
    model = load_from_args(args)
    table = Table(title=f"{args.prompt!r} -> next token ({model.spec})")
    table.add_column("rank", justify="right")
    table.add_column("token")
    table.add_column("p", justify="right")
    for rank, (token, p) in enumerate(model.top_tokens(args.prompt, k=args.k), 1):
        table.add_row(str(rank), repr(token), f"{p:.4f}")
    console.print(table)


def register(sub) -> None:
    p = sub.add_parser("models", help="list model specs and which are available here")
    p.set_defaults(func=_models)
    p = sub.add_parser("predict", help="print the top next tokens of a prompt",
                       description="Print the k most likely next tokens after PROMPT with their probabilities.")
    p.add_argument("prompt")
    p.add_argument("-k", type=int, default=5, help="how many tokens; default: %(default)s")
    add_model_args(p)
    p.set_defaults(func=_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracekit",
        description="Causal tracing and weight editing for language models "
                    "(reproducing 'Does Localization Inform Editing?').",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = sys.modules[__name__] if name == __name__ else importlib.import_module(name)
        except ModuleNotFoundError as err:
            if name == err.name or name.startswith(f"{err.name}."):  # area not in this build
                continue
            raise
        module.register(sub)
    return parser


def run_reporting_errors(fn, interrupted: str = "") -> int:
    """Run ``fn()``; bad input prints one line (no traceback) and gives exit status 2."""
    try:
        fn()
    except TracekitError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]{interrupted}")
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
