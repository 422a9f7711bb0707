#!/usr/bin/env python
"""Measure what the CounterFact study costs on this machine, on a few known CounterFact points.

    python docs/replication/counterfact/measure_costs.py --store docs/replication/counterfact/store.sqlite \\
        --corpus ../shared/data/wikitext/wikitext-2-raw-v1.test.raw --out docs/replication/counterfact/costs.json

Times (wall and process CPU seconds; on a shared machine CPU time is the steadier number, and
the load average is recorded beside each timing), one thread, float32: the key statistics from the WikiText-2 corpus (once per model and
layer set); MLP tracing at windows 5 and 10 and representation zeroing per point; and per edit,
the edit itself and its scoring, for ROME, MEMIT, FT-1 and FT-5 on every problem, at a few
layers. A point's first scoring also samples its essence texts and runs the "before" pass; the
later ones reuse them (as the sweep does), so both are reported. Each timing is written to
``--out`` as it is taken, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from tracekit import load_model
from tracekit.data import filter_known, load_dataset
from tracekit.editing.api import default_hparams, edit, warm_key_statistics
from tracekit.editing.metrics import baseline_cached
from tracekit.editing.problems import Problem
from tracekit.store import ResultStore
from tracekit.tracing import trace, zero_trace

PROBLEMS = ("error-injection", "tracing-reversal", "fact-erasure", "fact-amplification", "fact-forcing")
METHODS = ("rome", "memit", "ft-1", "ft-5")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--store", required=True, help="store with the known-fact verdicts")
    parser.add_argument("--corpus", required=True, help="text corpus for the key statistics (WikiText-2)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ei-layers", type=int, nargs="+", default=[0, 12, 25])
    parser.add_argument("--other-layer", type=int, default=12)
    parser.add_argument("--stats-layers", type=int, nargs="+", default=[0, 3, 4, 8, 12, 17, 21, 25, 29])
    args = parser.parse_args(argv)

    out: dict = {"model": args.model, "corpus": args.corpus, "traces": [], "edits": []}

    def save():
        Path(args.out).write_text(json.dumps(out, indent=1))

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def since(start: tuple[float, float]) -> dict:
        wall, cpu = clocks()
        return dict(wall_s=wall - start[0], cpu_s=cpu - start[1], load=os.getloadavg()[0])

    model = load_model(args.model)
    with ResultStore(args.store, readonly=True) as store:
        known = filter_known(model, load_dataset("counterfact"), cache=store, progress=False)  # cached verdicts
    by_relation = {}
    for record in known:
        by_relation.setdefault(record.relation_id, record)
    points = [by_relation[r] for r in ("P103", "P176")]  # a mother-tongue and a manufacturer fact
    out["points"] = [dict(case_id=p.case_id, text=p.text, prompt_sets=p.prompt_sets) for p in points]

    def hparams(method, problem):
        hp = default_hparams(model, method, Problem.parse(problem))
        return dataclasses.replace(hp, corpus=args.corpus) if hasattr(hp, "corpus") else hp

    started = clocks()
    for method in ("rome", "memit"):  # the same statistics settings: one pass, then cached
        warm_key_statistics(model, [method], args.stats_layers, hparams(method, "error-injection"), clip_window=True)
    hp = hparams("rome", "error-injection")
    out["key_statistics"] = dict(**since(started), layers=args.stats_layers,
                                 samples=hp.mom2_n_samples, sample_tokens=hp.mom2_sample_tokens,
                                 note="one pass for all layers of ROME and MEMIT's windows; cached afterwards")
    save()

    for point in points:
        for kind, window in (("mlp", 5), ("mlp", 10), ("zero", 5)):
            started = clocks()
            if kind == "zero":
                zero_trace(model, point.text, point.subject, point.target_true, kind="mlp", window=window)
            else:
                trace(model, point.text, point.subject, point.target_true, kind=kind, window=window, samples=10,
                      seed=point.case_id)
            out["traces"].append(dict(case_id=point.case_id, kind=kind, window=window,
                                      tokens=len(model.tokenizer(point.text)["input_ids"]), **since(started)))
            save()

    plan = [(p, problem, method, layer) for p in points for method in METHODS for layer in args.ei_layers
            for problem in ("error-injection",)]
    plan += [(points[0], problem, method, args.other_layer) for problem in PROBLEMS[1:] for method in METHODS]
    with baseline_cached(model):
        scored_before: set[tuple] = set()
        for point, problem, method, layer in plan:
            started = clocks()
            try:
                result = edit(model, point, method=method, problem=problem, layer=layer,
                              hparams=hparams(method, problem), seed=point.case_id, clip_window=True)
            except Exception as err:  # a skipped point (Fact Erasure below 0.02) is recorded, not fatal
                out["edits"].append(dict(case_id=point.case_id, problem=problem, method=method, layer=layer,
                                         error=f"{type(err).__name__}: {err}"))
                save()
                continue
            first = (point.case_id, problem) not in scored_before
            scored_before.add((point.case_id, problem))
            out["edits"].append(dict(case_id=point.case_id, problem=problem, method=method, layer=layer,
                                     edit_s=result.seconds["edit"], score_s=result.seconds.get("evaluate"),
                                     **since(started), first_scoring_of_point=first,
                                     rewrite=result.scores.scores.get("rewrite")))
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
