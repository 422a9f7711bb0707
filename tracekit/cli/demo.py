"""``tracekit demo``: the main job. Trace where a fact lives, then edit it, on one model."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from tracekit.cli.common import add_model_args, console, load_from_args

TRACE_PROMPT = "The Eiffel Tower is located in the city of"
TRACE_SUBJECT = "The Eiffel Tower"
EDIT_PROMPT, EDIT_SUBJECT, EDIT_TARGET, EDIT_TRUE = "The mother tongue of {} is", "Danielle Darrieux", " English", " French"
PARAPHRASES = ("Danielle Darrieux, a native speaker of", "Danielle Darrieux grew up speaking")
NEIGHBOURS = ("The mother tongue of Jean Marais is", "The mother tongue of Brigitte Bardot is")
METHODS = ("rome", "memit", "ft-1", "ft-5")


def _demo(args) -> None:
    from tracekit.cli.editing import print_edit_tables
    from tracekit.data.records import FactRecord
    from tracekit.editing.api import edit
    from tracekit.tracing import trace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_from_args(args)
    window = min(args.window, model.n_layers)  # a 4-layer test model cannot restore 10 layers
    console.rule(f"1. causal trace: {TRACE_PROMPT!r} (MLP, window {window}, {args.samples} samples)")
    started = time.perf_counter()
    result = trace(model, TRACE_PROMPT, TRACE_SUBJECT, kind="mlp", window=window, samples=args.samples)
    trace_seconds = time.perf_counter() - started
    console.print(result)
    result.to_json(out / "trace-mlp.json")
    result.save(out / "trace-mlp.png")

    console.rule(f"2. {args.method.upper()} edit: {EDIT_PROMPT.format(EDIT_SUBJECT)!r} -> {EDIT_TARGET!r}")
    record = FactRecord(case_id=0, prompt=EDIT_PROMPT, subject=EDIT_SUBJECT, target_true=EDIT_TRUE,
                        target_new=EDIT_TARGET, paraphrase_prompts=PARAPHRASES, neighborhood_prompts=NEIGHBOURS,
                        source="demo")
    started = time.perf_counter()
    edited = edit(model, record, method=args.method, problem="error-injection", hparams=_demo_hparams(model, args.method))
    edit_seconds = time.perf_counter() - started
    statistics = _statistics_source(model, edited)
    if statistics:
        console.print(f"key statistics: {statistics}", highlight=False)
    print_edit_tables(edited, console)
    summary = {
        "model": model.spec, "backend": model.backend.name,
        "trace": {"prompt": TRACE_PROMPT, "answer": result.answer, "p_clean": result.p_clean,
                  "p_noise": result.p_noise, "window": window, "seconds": round(trace_seconds, 2)},
        "edit": {**edited.row(), "key_statistics": statistics, "seconds_total": round(edit_seconds, 2)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"wrote {out}/trace-mlp.png, trace-mlp.json and summary.json")


def _demo_hparams(model, method: str):
    """The method's preset, with 64 key-statistics samples for ROME/MEMIT (64 instead of 256 move
    the demo's scores by < 0.01, ``tracekit.editing.presets.SMOLLM2_NOTE``)."""
    from tracekit.editing.api import default_hparams
    from tracekit.editing.problems import Problem

    hparams = default_hparams(model, method, Problem.ERROR_INJECTION)
    if method in ("rome", "memit"):
        hparams = dataclasses.replace(hparams, mom2_n_samples=64)
    return hparams


def _statistics_source(model, edited) -> str | None:
    """Which text ROME's or MEMIT's key statistics came from (read back from their cache)."""
    if edited.method not in ("rome", "memit"):
        return None
    from tracekit.editing.covariance import second_moments

    hp = edited.hparams
    stats = second_moments(model, [edited.layers[0]], n_samples=hp.mom2_n_samples, sample_tokens=hp.mom2_sample_tokens,
                           dtype=hp.mom2_dtype, corpus=hp.corpus, progress=False)[edited.layers[0]]
    sample_tokens = int(stats.metadata["sample_tokens"])
    return f"{stats.source}; {stats.tokens // sample_tokens} samples of {sample_tokens} tokens"


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job: trace a fact and edit it on the bundled model",
                       description="Causal trace of 'The Eiffel Tower is located in the city of' (MLP states), "
                                   "then a ROME edit making Danielle Darrieux's mother tongue English, with scores.")
    p.add_argument("--out", default="out/demo", help="folder for the heatmap, JSON results; default: %(default)s")
    p.add_argument("--method", default="rome", choices=METHODS, help="editor; default: %(default)s")
    p.add_argument("--window", type=int, default=10,
                   help="tracing window (cut to the model's layers); default: %(default)s")
    p.add_argument("--samples", type=int, default=10, help="noise samples; default: %(default)s")
    add_model_args(p)
    p.set_defaults(func=_demo)
