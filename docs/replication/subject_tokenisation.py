#!/usr/bin/env python
"""Why ROME rewrites subject-first prompts badly on SmolLM2: the key follows the subject's tokens.

ROME averages the subject's key k* over context templates. 20 of its 21 templates end in ". {}",
so there the subject follows a space. In "Seville is a city in the country of" it follows the
document-start token and has no leading space. "Seville" and " Seville" are different tokens,
so the edit is made for a key that the edited prompt never produces.

This script re-edits, at one layer, the facts of a replication store with the lowest stored
ROME rewrite scores, with four template sets:
    space     ROME's templates ("<prefix>. {}")
    newline   the same prefixes ending in ".\\n{}", where the subject keeps its bare tokens
    mixed     half of each
    two-keys  ROME's templates with ``key_per_tokenisation`` (tracekit's extension: the update
              maps the key of each subject tokenisation onto v*, instead of their average)
    paper-form  ROME's templates, the "space" edit's v*, written with the paper's equation
              (the average key k* gets v*, as in tracekit 0.1) instead of the public code's
              (the edited prompt's own key gets v*): the update's form alone
and prints rewrite / paraphrase / neighbourhood scores (the paraphrases put a space before the
subject). ``--conventions``: ROME as the public code (tracekit's default; the edited prompt's own
key k_p goes onto v*) or tracekit 0.1's (the paper's equation: the average key k* goes onto v*),
with which the store and the first tables of the README were made.

    python docs/replication/subject_tokenisation.py --store docs/replication/store.sqlite --n 10
    python docs/replication/subject_tokenisation.py --store docs/replication/store.sqlite \\
        --n 66 --relation city-country --variants space two-keys --out city_country.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rich.table import Table

import tracekit
from tracekit.cli import console
from tracekit.data.loaders import load_dataset
from tracekit.editing.context import context_templates
from tracekit.editing.hparams import LEGACY
from tracekit.editing.metrics import MetricsConfig, evaluate_edit
from tracekit.editing.presets import rome_preset
from tracekit.editing.problems import prepare
from tracekit.editing.rome import apply_rome, key_statistics
from tracekit.store import ResultStore

SCORES = ("rewrite", "paraphrase", "neighborhood")


def template_sets(space: list[str]) -> dict[str, list[str]]:
    newline = [t.replace(". {}", ".\n{}") for t in space]  # "{}" (the bare prompt) is unchanged
    mixed = [n if i % 2 == 0 else s for i, (s, n) in enumerate(zip(space, newline))]
    return {"space": space, "newline": newline, "mixed": mixed, "two-keys": space, "paper-form": space}


def paper_form(model, edit, C, hparams):
    """``edit``'s own v*, written with the paper's equation (W' k* = v*: the average key k* gets v*)
    instead of the public code's (the edited prompt's key k_p gets v*). Only the update's form
    differs, so this isolates it; it costs no optimisation."""
    from tracekit.editing.delta import Edit
    from tracekit.editing.rome import rank_one

    d = edit.info.details
    update = rank_one(C, d["key"], d["v_star"] - d["mean_output"], d["key"], hparams)
    (name,) = edit.parameter_names
    weight = model.hf.get_parameter(name)
    new = model.adapter.from_out_in(model.adapter.as_out_in(weight.detach()).float() + update)
    return Edit(model.hf, {name: new}, edit.info)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="replication store with ROME Error Injection edits")
    parser.add_argument("--n", type=int, default=10, help="facts, lowest stored rewrite first; default: %(default)s")
    parser.add_argument("--layer", type=int, default=3, help="edit layer; default: %(default)s")
    parser.add_argument("--relation", default=None, help="only facts of this relation (e.g. city-country)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="template sets to run: space, newline, mixed, two-keys, paper-form (default: all)")
    parser.add_argument("--conventions", default="reference", choices=("reference", "tracekit-0.1"),
                        help="ROME as the public code, or as tracekit 0.1 (the paper's equation form); "
                             "default: %(default)s")
    parser.add_argument("--out", default=None, help="JSON file for the scores (default: beside this script)")
    args = parser.parse_args(argv)

    with ResultStore(args.store, readonly=True) as store:
        edits = store.edits_frame()
    rows = edits[(edits["method"] == "rome") & (edits["problem"] == "error-injection") & (edits["layer"] == args.layer)]
    if rows.empty:
        parser.error(f"{args.store} has no ROME Error Injection edits at layer {args.layer}")
    facts = {f.case_id: f for f in load_dataset(rows["dataset"].iloc[0])}
    if args.relation is not None:
        rows = rows[[facts[c].relation_id == args.relation for c in rows["case_id"]]]
        if rows.empty:
            parser.error(f"no edited facts of relation {args.relation!r}")
    rows = rows.sort_values("rewrite").head(args.n)
    model = tracekit.load_model(rows["model"].iloc[0].split("#")[0])
    hparams = rome_preset(model, "error-injection")
    if args.conventions == "tracekit-0.1":
        hparams = dataclasses.replace(hparams, **LEGACY["rome"])
    per_form = dataclasses.replace(hparams, key_per_tokenisation=True)
    sets = template_sets(context_templates(model, hparams.context_lengths, hparams.context_seed))
    unknown = set(args.variants or ()) - set(sets)
    if unknown:
        parser.error(f"unknown template sets {sorted(unknown)}; choose from {', '.join(sets)}")
    sets = {name: sets[name] for name in (args.variants or sets)}

    if "paper-form" in sets and "space" not in list(sets)[:list(sets).index("paper-form")]:
        parser.error("paper-form rewrites the space edit: list space before it")
    C = key_statistics(model, [args.layer], hparams, progress=False)[0][args.layer] if "paper-form" in sets else None
    results = []
    for row in rows.itertuples():
        fact = facts[row.case_id]
        setup = prepare(model, fact, "error-injection", seed=0, noise="s3")
        scores, edits = {}, {}
        for name, templates in sets.items():
            chosen = per_form if name == "two-keys" else hparams
            if name == "paper-form":
                edit = paper_form(model, edits["space"], C, hparams)
            else:
                edit = apply_rome(model, setup.request, args.layer, chosen, templates=templates, progress=False)
            edits[name] = edit
            got = evaluate_edit(model, setup, edit, MetricsConfig(essence=False)).scores
            scores[name] = {k: float(got[k]) for k in SCORES}
        results.append({"case_id": int(row.case_id), "prompt": fact.text, "scores": scores})
        console.print(f"{fact.text!r}: " + "; ".join(
            f"{name} " + "/".join(f"{s[k]:.2f}" for k in SCORES) for name, s in scores.items()))

    table = Table(title=f"ROME ({args.conventions}) at layer {args.layer}, {len(results)} facts with the lowest stored rewrite"
                        f"{'' if args.relation is None else f' ({args.relation})'}: mean scores")
    table.add_column("templates")
    for k in SCORES:
        table.add_column(k, justify="right")
    for name in sets:
        table.add_row(name, *(f"{sum(r['scores'][name][k] for r in results) / len(results):.3f}" for k in SCORES))
    console.print(table)
    out = Path(args.out) if args.out else Path(__file__).with_suffix(".json")
    out.write_text(json.dumps({"layer": args.layer, "conventions": args.conventions, "facts": results}, indent=1) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
