#!/usr/bin/env python
"""The measured effect of each convention where tracekit can differ from the reference code.

On the bundled SmolLM2-135M, edits a handful of built-in world facts (Error Injection) with ROME,
MEMIT and FT-1 under the reference conventions (tracekit's defaults) and with conventions
switched, and prints mean rewrite / paraphrase / neighbourhood scores (the paper's text
scoring) and the change of the weight update relative to the reference one. For ROME, "paper's
equation, same v*" keeps the reference's v* and changes only the update's form, and gamma =
(C^-1 k*)^T k_p / (C^-1 k*)^T k* is what that form delivers to the edited prompt as a fraction
of the public code's.

    python docs/fidelity_effects.py --facts 0 17 87 88 125 --out docs/fidelity_effects.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from rich.table import Table

import tracekit
from tracekit.cli import console
from tracekit.data.loaders import load_dataset
from tracekit.editing.finetune import LEGACY_FT, apply_ft
from tracekit.editing.hparams import LEGACY
from tracekit.editing.memit import apply_memit
from tracekit.editing.metrics import MetricsConfig, evaluate_edit
from tracekit.editing.presets import ft_preset, memit_preset, rome_preset
from tracekit.editing.problems import prepare
from tracekit.editing.rome import apply_rome

SCORES = ("rewrite", "paraphrase", "neighborhood")
PAPER_FORM = "paper's equation, same v*"
VARIANTS = {
    "rome": {"reference (public code)": {}, PAPER_FORM: None,
             "value_reference=mean": {"value_reference": "mean"},
             "tracekit 0.1 (paper's equation, mean value, NLL stop, 20 steps)": LEGACY["rome"]},
    "memit": {"reference (public code)": {}, "tracekit 0.1 (uniform keys, mean z and value, NLL stop)": LEGACY["memit"]},
    "ft-1": {"reference (paper code)": {}, "tracekit 0.1 (mean NLL, no bias)": LEGACY_FT},
}


def run(model, method: str, setup, changes: dict):
    if method == "rome":
        hp = dataclasses.replace(rome_preset(model, "error-injection"), **changes)
        return apply_rome(model, setup.request, hp.layer, hp, progress=False)
    if method == "memit":
        hp = dataclasses.replace(memit_preset(model, "error-injection"), **changes)
        return apply_memit(model, setup.request, hp.layer, hp, progress=False)
    hp = dataclasses.replace(ft_preset(model, "error-injection", 1), **changes)
    return apply_ft(model, setup.request, hp.layer, hp)


def paper_form(model, edit):
    """The reference edit's v*, written with the paper's equation: W' k* = v*."""
    from tracekit.editing.delta import Edit
    from tracekit.editing.rome import rank_one

    hp = rome_preset(model, "error-injection")
    d = edit.info.details
    C = _second_moment(model)
    update = rank_one(C, d["key"], d["v_star"] - d["mean_output"], d["key"], hp)
    (name,) = edit.parameter_names
    weight = model.hf.get_parameter(name)
    new = model.adapter.from_out_in(model.adapter.as_out_in(weight.detach()).float() + update)
    return Edit(model.hf, {name: new}, edit.info)


def _second_moment(model):
    from tracekit.editing.covariance import second_moments

    hp = rome_preset(model, "error-injection")
    return second_moments(model, [hp.layer], n_samples=hp.mom2_n_samples, sample_tokens=hp.mom2_sample_tokens,
                          dtype=hp.mom2_dtype, progress=False)[hp.layer].matrix


def gamma(model, edit) -> float:
    """(C^-1 k*)^T k_p / (C^-1 k*)^T k* for a ROME edit (from its statistics and keys)."""
    hp = rome_preset(model, "error-injection")
    C = _second_moment(model).double()
    A = C + hp.mom2_ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    k_star = edit.info.details["key"].double()
    (k_p,) = edit.info.details["keys"].double()
    u = torch.linalg.solve(A, k_star)
    return float(u @ k_p / (u @ k_star))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, nargs="+", default=[0, 17, 87, 88, 125], help="world-fact case ids")
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(Path(__file__).with_name("fidelity_effects.json")))
    args = parser.parse_args(argv)
    model = tracekit.load_model("smollm2-135m")
    facts = {f.case_id: f for f in load_dataset("worldfacts")}
    metrics = MetricsConfig(essence=False)
    out = {"model": model.spec, "facts": [facts[c].text for c in args.facts], "methods": {}}
    for method in args.methods:
        per_variant = {name: [] for name in VARIANTS[method]}
        for case_id in args.facts:
            setup = prepare(model, facts[case_id], "error-injection")
            reference, first = None, None
            for name, changes in VARIANTS[method].items():
                edit = paper_form(model, first) if changes is None else run(model, method, setup, changes)
                first = edit if first is None else first
                scores = evaluate_edit(model, setup, edit, metrics).scores
                deltas = {k: edit.delta(k).double() for k in edit.parameter_names}
                reference = deltas if reference is None else reference
                shift = max(float((deltas[k] - reference[k]).norm() / reference[k].norm()) for k in reference)
                row = {"case_id": case_id, **{k: float(scores[k]) for k in SCORES}, "update_change": shift}
                if method == "rome" and changes == {}:
                    row["gamma"] = gamma(model, edit)
                per_variant[name].append(row)
                console.print(f"{method} {name} {facts[case_id].text!r}: "
                              + " ".join(f"{k} {row[k]:.3f}" for k in (*SCORES, "update_change")))
        out["methods"][method] = per_variant
        table = Table(title=f"{method}, Error Injection, {len(args.facts)} world facts: means")
        for column in ("variant", *SCORES, "update change"):
            table.add_column(column, justify="left" if column == "variant" else "right")
        for name, rows in per_variant.items():
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in (*SCORES, "update_change")}
            table.add_row(name, *(f"{mean[k]:.3f}" for k in SCORES), f"{mean['update_change']:.2f}")
        console.print(table)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
