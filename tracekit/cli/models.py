"""``tracekit models`` and ``tracekit predict``."""

from __future__ import annotations

from tracekit.cli.common import add_model_args, add_prompt_args, console, fill, load_from_args, prompt_template
from tracekit.errors import check


def _models(args) -> None:
    from rich.table import Table

    from tracekit.models import list_specs

    table = Table(title="tracekit model specs")
    for column in ("spec", "what", "runs here"):
        table.add_column(column)
    for info in list_specs():
        table.add_row(info.spec, info.what, "yes" if info.available else "no")
    console.print(table)


def _predict(args) -> None:
    from rich.table import Table

    prompt = args.prompt
    if args.subject is not None:
        prompt = fill(prompt_template(prompt, args.subject), args.subject)[0]
    check("{}" not in prompt, f"--prompt {prompt!r} has a {{}}: give --subject to fill it")
    model = load_from_args(args)
    table = Table(title=f"{prompt!r} -> next token ({model.spec})")
    table.add_column("rank", justify="right")
    table.add_column("token")
    table.add_column("p", justify="right")
    for rank, (token, p) in enumerate(model.top_tokens(prompt, k=args.k), 1):
        table.add_row(str(rank), repr(token), f"{p:.4f}")
    console.print(table)


def register(sub) -> None:
    p = sub.add_parser("models", help="list model specs and which of them run here",
                       description="Every kind of model spec, and whether it runs on this machine (its package "
                                   "installed, enough memory, the hub reachable).")
    p.set_defaults(func=_models)
    p = sub.add_parser("predict", help="print the top next tokens of a prompt",
                       description="Print the k most likely next tokens after --prompt with their probabilities.")
    add_prompt_args(p, subject=None)
    p.add_argument("--subject", default=None, help="fills a {} in --prompt (optional)")
    p.add_argument("-k", type=int, default=5, help="how many tokens (1 to the vocabulary size); default: %(default)s")
    add_model_args(p)
    p.set_defaults(func=_predict)
