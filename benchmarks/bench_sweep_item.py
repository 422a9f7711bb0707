"""Seconds per (point, layer) item of an editing sweep, as ``tracekit edit-sweep`` runs them.

    OMP_NUM_THREADS=1 python benchmarks/bench_sweep_item.py                  # ROME, 2 points x 9 layers
    OMP_NUM_THREADS=1 python benchmarks/bench_sweep_item.py --batch 1 4 --layers 8 --points 4
    OMP_NUM_THREADS=1 python benchmarks/bench_sweep_item.py --methods ft-1 --batch 1 8 --score-batch 1 --points 8
    PYTHONPATH=/path/to/older/checkout python benchmarks/bench_sweep_item.py  # the same on older code

CounterFact points (``../shared/data`` or ``$TRACEKIT_DATA``) on the bundled SmolLM2-135M, the
editing presets, essence on: each item is an edit plus its scoring, and a point's one-off work
(sampling its essence texts, its "before" pass) is in the timing, shared by its layers as in a
sweep. One point is edited first to warm the caches (key statistics, context templates). Reports
process CPU seconds (one thread: the figure a quiet core would show) and wall seconds, and the
scores, so two runs (two batch sizes, or two versions of tracekit) can be checked to agree.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

STUDY_LAYERS = [0, 3, 4, 8, 12, 17, 21, 25, 29]  # docs/replication/counterfact: Error Injection's layers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--points", type=int, default=2, help="CounterFact points timed (after one warm-up point)")
    parser.add_argument("--layers", type=int, nargs="+", default=STUDY_LAYERS)
    parser.add_argument("--methods", nargs="+", default=["rome"])
    parser.add_argument("--problems", nargs="+", default=["error-injection"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="points edited together (one run each)")
    parser.add_argument("--score-batch", type=int, default=None,
                        help="of a batch, points scored in one pass (default: the whole batch)")
    parser.add_argument("--convention", default="paper-code", choices=("paper-code", "tracekit"),
                        help="subject-noise convention of Fact Forcing / Tracing Reversal (edit-sweep --convention)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)

    import torch

    import tracekit
    from tracekit.data.loaders import load_dataset
    from tracekit.store import ResultStore
    from tracekit.studies import edit_study

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = tracekit.load_model(args.model)
    records = load_dataset("counterfact", None, args.points + 1)
    folder = Path(tempfile.mkdtemp(prefix="tracekit-bench-item-"))
    methods, problems = tuple(args.methods), tuple(args.problems)
    edit_study(model, records[:1], ResultStore(folder / "warm.sqlite"), methods=methods, problems=problems,
               layers=args.layers[:1], progress=False, convention=args.convention)
    report = {"code": tracekit.__file__, "model": args.model, "methods": methods, "problems": problems,
              "layers": args.layers, "points": args.points, "score_batch": args.score_batch,
              "convention": args.convention,
              "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(), "runs": {}}
    for batch in args.batch:
        path = folder / f"batch{batch}.sqlite"
        cpu, wall = time.process_time(), time.perf_counter()
        done = edit_study(model, records[1:], ResultStore(path), methods=methods, problems=problems,
                          layers=args.layers, progress=False, batch=batch, score_batch=args.score_batch,
                          convention=args.convention)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        with ResultStore(path, readonly=True) as store:
            frame = store.edits_frame(only_ok=False)
        columns = [c for c in ("case_id", "method", "layer", "rewrite", "paraphrase", "neighborhood", "essence")
                   if c in frame.columns]
        items = max(done.computed, 1)
        report["runs"][str(batch)] = {"items": done.computed, "cpu_seconds_per_item": cpu / items,
                                      "wall_seconds_per_item": wall / items,
                                      "scores": frame[columns].sort_values(columns[:3]).round(6).values.tolist()}
        print(f"batch {batch}: {done.computed} items, {cpu / items:.2f} CPU s / item, {wall / items:.2f} wall s / item",
              flush=True)
    report["load_average_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
