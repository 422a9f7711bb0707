"""``tracekit edit``: edit one fact and print a before/after table and every score."""

from __future__ import annotations

import json
import math

from tracekit.cli.common import add_model_args, add_prompt_args, console, fill, load_from_args, prompt_template
from tracekit.errors import check

METHODS = ("rome", "memit", "ft-1", "ft-5")  # == tracekit.editing.api.METHODS (tested)
PROBLEMS = ("error-injection", "tracing-reversal", "fact-erasure", "fact-amplification",
            "fact-forcing")  # == tracekit.editing.problems.problem_names() (tested)
CONVENTIONS = ("paper-code", "tracekit")  # == tracekit.editing.subject_noise.CONVENTIONS (tested)

# Stand-ins used when the user gives no paraphrases / neighbours (said so in the output).
DEFAULT_FILLERS = ("The weather was mild that spring.", "He closed the book and looked up.")
DEFAULT_NEIGHBOUR_SUBJECTS = ("Albert Einstein", "Barack Obama", "Pablo Picasso", "Marie Curie", "Tokyo")


def register(sub) -> None:
    p = sub.add_parser(
        "edit", help="edit one fact (ROME, MEMIT, FT-1, FT-5) and score it",
        description="Edit one fact and print p(object) before/after on the edit prompt, paraphrases and "
                    "neighbourhood prompts, with rewrite/paraphrase/neighborhood/overall/essence scores "
                    "and Meng et al.'s unscaled metrics. The model is not saved.")
    add_prompt_args(p, subject="the subject whose fact is edited, as written in the prompt")
    p.add_argument("--target", default=None, help='new object, with its leading space: " English"')
    p.add_argument("--true", dest="o_true", default=None,
                   help="the true object (default: the model's top prediction)")
    p.add_argument("--method", default="rome", choices=METHODS, help="editor; default: %(default)s")
    p.add_argument("--problem", default="error-injection", choices=PROBLEMS,
                   help="editing problem (what the edit writes); default: %(default)s")
    p.add_argument("--layer", type=int, default=None, help="edit layer (default: the preset's)")
    p.add_argument("--paraphrase", action="append", default=[], help="a paraphrase prompt (repeatable)")
    p.add_argument("--neighbor", action="append", default=[], help="a neighbourhood prompt (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="noise and essence-sampling seed; default: %(default)s")
    p.add_argument("--noise", default="s3", type=noise_rule,
                   help="noise rule for tracing-reversal / fact-forcing: 's3' (3 x the embedding std of known_1000 "
                        "subjects), a float, or 'u<scale>'; default: %(default)s")
    p.add_argument("--convention", default="paper-code", choices=CONVENTIONS,
                   help="how o_noise and the subject noise are made: as the paper's code, or tracekit's single "
                        "seeded draw (docs/fidelity.md); default: %(default)s")
    p.add_argument("--scoring", default="paper-text", choices=("paper-text", "paper-code"),
                   help="score formulas as the paper's text states them (first-token p, every paraphrase) or as "
                        "its code computes them (whole-object p, first prompt of each kind); default: %(default)s")
    p.add_argument("--no-essence", action="store_true", help="skip the essence score (saves sampling time)")
    p.add_argument("--json", default=None, help="also write the result row to this JSON file")
    add_model_args(p)
    p.set_defaults(func=_edit)


def noise_rule(text: str) -> str:
    """argparse type: a valid noise rule, or a one-line usage error (inf, nan, <= 0 included)."""
    import argparse

    from tracekit.errors import TracekitError
    from tracekit.tracing.noise import NoiseRule

    try:
        NoiseRule.parse(text)
    except TracekitError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def build_record(model, args):
    """A FactRecord from the command line, and notes on every default filled in."""
    from tracekit.data import FactRecord

    template = prompt_template(args.prompt, args.subject, args.occurrence)
    text, occurrence = fill(template, args.subject)
    model.subject_span(text, args.subject, occurrence)  # a one-line error if no token covers it
    notes = []
    target = args.target
    check(target is None or target.strip() != "", "empty --target: give the new object, e.g. ' English'")
    o_true = args.o_true
    if o_true is None and (args.problem in ("error-injection", "tracing-reversal") or target is None):
        o_true = model.top_tokens(text, k=1)[0][0]
        notes.append(f"no --true given: the true object is the model's top prediction {o_true!r}")
    if args.problem == "error-injection":
        check(target is not None, "error-injection needs --target (the false object to write)")
        o_false = target
    elif args.problem == "tracing-reversal":
        o_false = None
        if target is not None:
            notes.append("tracing-reversal writes the noised run's top prediction; --target is ignored")
    else:  # erasure / amplification / forcing act on o_true; --target, if given and different, competes
        o_true = o_true or target
        o_false = target if target is not None and target != o_true else None
    paraphrases = tuple(args.paraphrase)
    if not paraphrases:
        paraphrases = tuple(f"{filler} {text}" for filler in DEFAULT_FILLERS)
        notes.append("no --paraphrase given: using the edit prompt after an unrelated sentence (2 prompts)")
    neighbours = tuple(args.neighbor)
    if not neighbours:
        others = [s for s in DEFAULT_NEIGHBOUR_SUBJECTS if s != args.subject]
        neighbours = tuple(fill(template, s)[0] for s in others)
        notes.append(f"no --neighbor given: using the prompt with stand-in subjects ({', '.join(others)}); "
                     "unlike CounterFact neighbours they need not share the true object")
    record = FactRecord(case_id=0, prompt=template, subject=args.subject, target_true=o_true,
                        target_new=o_false, paraphrase_prompts=paraphrases, neighborhood_prompts=neighbours,
                        source="cli")
    return record, notes


def _edit(args) -> None:
    from tracekit.editing.api import edit, nan_to_none
    from tracekit.editing.metrics import MetricsConfig

    model = load_from_args(args)
    record, notes = build_record(model, args)
    with console.status(f"{args.method} edit ({args.problem}) and evaluation"):
        result = edit(model, record, method=args.method, problem=args.problem, layer=args.layer, seed=args.seed,
                      noise=args.noise, convention=args.convention,
                      metrics=MetricsConfig(scoring=args.scoring, essence=not args.no_essence, seed=args.seed))
    print_edit_tables(result, console)
    for note in [*notes, *result.scores.notes, f"scoring: {result.scores.scoring}"]:
        console.print(f"[dim]- {note}[/dim]", highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(nan_to_none(result.row()), f, indent=2, default=str)
        console.print(f"wrote {args.json}")


def print_edit_tables(result, console) -> None:
    """The per-prompt probabilities with their legend, then the scores."""
    table, legend = probability_table(result)
    console.print(table)
    for line in legend:
        console.print(f"  {line}", highlight=False)
    console.print(score_table(result))


def probability_table(result):
    """p(object) before/after per prompt (tagged R, P1.., N1..) as a rich Table, and the legend of tags."""
    from rich.table import Table

    s = result.scores
    title = (f"{result.method} at layer{'s' if len(result.layers) > 1 else ''} "
             f"{', '.join(map(str, result.layers))}, {result.problem or 'request'}: "
             f"{result.request.text!r} -> {result.request.target!r}"
             f"{' (minimised)' if result.request.minimize else ''}")
    table = Table(title=title, caption="*: subject noised; log p: mean over all the object's tokens, before > after")
    table.add_column("prompt", no_wrap=True)
    table.add_column("object", no_wrap=True, overflow="ellipsis", max_width=16)
    for column in ("p before", "p after", "change", "log p"):
        table.add_column(column, justify="right", no_wrap=True)
    tags: dict[tuple[str, str], str] = {}
    counts = {"rewrite": 0, "paraphrase": 0, "neighborhood": 0}
    seen, legend = set(), []
    for row in s.rows:
        key = (row.kind, row.prompt, row.obj)
        if key in seen:  # the target is often also o_true or the counter object
            continue
        seen.add(key)
        first = (row.kind, row.prompt) not in tags
        if first:
            counts[row.kind] += 1
            letter = {"rewrite": "R", "paraphrase": "P", "neighborhood": "N"}[row.kind]
            tags[(row.kind, row.prompt)] = letter if row.kind == "rewrite" else f"{letter}{counts[row.kind]}"
            legend.append(f"{tags[(row.kind, row.prompt)]}: {row.prompt}")
        tag = tags[(row.kind, row.prompt)] + ("*" if row.noised else "")
        table.add_row(tag if first else "", repr(row.obj), f"{row.p_before:.4f}", f"{row.p_after:.4f}",
                      f"{row.p_after - row.p_before:+.4f}", f"{row.logprob_before:.2f} > {row.logprob_after:.2f}")
    return table, legend


def score_table(result):
    from rich.table import Table

    table = Table(title="scores")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.scores.scores.items():
        table.add_row(name, "n/a" if math.isnan(value) else f"{value:.4f}")
    s = result.scores
    if not math.isnan(s.ppl_before):
        table.add_row("essence perplexity before -> after", f"{s.ppl_before:.2f} -> {s.ppl_after:.2f}")
    for name, seconds in result.seconds.items():
        table.add_row(f"seconds ({name})", f"{seconds:.1f}")
    return table
