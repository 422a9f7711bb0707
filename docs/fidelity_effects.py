#!/usr/bin/env python
"""The measured effect of each convention where tracekit can differ from the reference code.

On the bundled SmolLM2-135M, edits a handful of built-in world facts (Error Injection) with ROME,
MEMIT and FT-1 under the reference conventions (tracekit's defaults) and with one convention
switched at a time, and prints mean rewrite / paraphrase / neighbourhood scores (the paper's
text scoring), the change of the weight update relative to the reference one, and, for ROME,
gamma = (C^-1 k*)^T k_p / (C^-1 k*)^T k*: what the paper's equation form delivers to the edited
prompt as a fraction of the public code's.

    python docs/fidelity_effects.py --facts 0 1 2 3 14 17 --out docs/fidelity_effects.json
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
VARIANTS = {
    "rome": {"reference (public code)": {}, "update_key=mean (paper's equation)": {"update_key": "mean"},
             "value_reference=mean": {"value_reference": "mean"},
             "v loop: stop on NLL, step every pass": {"v_stop_on": "nll", "v_final_step": True},
             "tracekit 0.1 (all of the above)": LEGACY["rome"]},
    "memit": {"reference (public code)": {}, "key_average=uniform": {"key_average": "uniform"},
              "z_current=mean": {"z_current": "mean"}, "value_reference=mean": {"value_reference": "mean"},
              "tracekit 0.1 (all)": LEGACY["memit"]},
    "ft-1": {"reference (paper code)": {}, "train_bias=False": {"train_bias": False},
             "tracekit 0.1 (mean NLL, no bias)": LEGACY_FT},
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


def gamma(model, edit) -> float:
    """(C^-1 k*)^T k_p / (C^-1 k*)^T k* for a ROME edit (from its statistics and keys)."""
    from tracekit.editing.covariance import second_moments

    hp = rome_preset(model, "error-injection")
    C = second_moments(model, [hp.layer], n_samples=hp.mom2_n_samples, sample_tokens=hp.mom2_sample_tokens,
                       dtype=hp.mom2_dtype, progress=False)[hp.layer].matrix.double()
    A = C + hp.mom2_ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    k_star = edit.info.details["key"].double()
    (k_p,) = edit.info.details["keys"].double()
    u = torch.linalg.solve(A, k_star)
    return float(u @ k_p / (u @ k_star))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, nargs="+", default=[0, 1, 2, 3, 14, 17], help="world-fact case ids")
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
            reference = None
            for name, changes in VARIANTS[method].items():
                edit = run(model, method, setup, changes)
                scores = evaluate_edit(model, setup, edit, metrics).scores
                deltas = {k: edit.delta(k).double() for k in edit.parameter_names}
                reference = deltas if reference is None else reference
                shift = max(float((deltas[k] - reference[k]).norm() / reference[k].norm()) for k in reference)
                row = {"case_id": case_id, **{k: float(scores[k]) for k in SCORES}, "update_change": shift}
                if method == "rome" and not changes:
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
