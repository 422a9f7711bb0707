"""Sweep benchmark: the same study items through the local executor and a Ray pool.

    python benchmarks/bench_sweep.py                      # tiny random model, 2 Ray workers (a few minutes)
    python benchmarks/bench_sweep.py --points 24 --workers 4 --address auto   # on a cluster

Three kinds of work, each into a fresh store, local first, then Ray (workers already loaded):
- ``noop``: items that compute nothing (a stand-in tracer returning fixed numbers), so the
  time per item is the executor's own cost: dispatch, transfer, one SQLite commit;
- ``trace``: causal traces (MLP, window 2, 2 samples) and zeroing of every point;
- ``edit``: ROME and FT-1 edits at two layers, scored (essence off), ROME's key statistics
  from a small corpus.
Per-item overhead of Ray = (Ray's wall x workers - the items' compute seconds) / items: the
time a worker slot spends on anything but computing, start-up excluded (reported apart).
Every run follows a one-point warm-up (first calls, ROME's key statistics), so the times are
the steady state of a long sweep.
Writes ``benchmarks/results/sweep-<model>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import tracekit
from tracekit.data.loaders import load_dataset
from tracekit.editing.finetune import FTHyperParams
from tracekit.editing.hparams import ROMEHyperParams
from tracekit.editing.metrics import MetricsConfig
from tracekit.store import ResultStore
from tracekit.studies import ModelSource, RayExecutor, edit_study, trace_study

CORPUS = ("The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.\n"
          "Steve Jobs was the founder of Apple. Microsoft was founded by Bill Gates.\n\n") * 60


class FixedTrace:
    p_clean, p_noise = 0.5, 0.1

    def effect_by_layer(self, reduce="max"):
        return [0.0, 0.5, 1.0, 0.5]

    def to_json(self):
        return "{}"


def fixed_trace(model, prompt, subject, target, **kwargs):  # defined in __main__: Ray ships it by value
    return FixedTrace()


def work(kind: str, model, records, store, corpus: str):
    if kind == "noop":
        return trace_study(model, records, store, kinds=("mlp", "attn", "resid", "zero"), windows=(1, 2, 3, 4),
                           trace_fn=fixed_trace, zero_fn=fixed_trace, progress=False)
    if kind == "trace":
        return trace_study(model, records, store, kinds=("mlp", "zero"), windows=(2,), samples=2, progress=False)
    rome = ROMEHyperParams(corpus=corpus, mom2_n_samples=40, mom2_sample_tokens=32, mom2_ridge=1e-2,
                           context_lengths=((3, 2),), v_num_grad_steps=4, v_weight_decay=0.0, clamp_norm_factor=1e3)
    return edit_study(model, records, store, methods=("rome", "ft-1"), layers=(1, 2),
                      hparams={"rome": rome, "ft-1": FTHyperParams(steps=3)}, metrics=MetricsConfig(essence=False),
                      progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt2-tiny")
    parser.add_argument("--points", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--address", default=None)
    parser.add_argument("--work", nargs="+", default=["noop", "trace", "edit"], choices=["noop", "trace", "edit"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local run (a Ray worker: 1)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    (root / "corpus.txt").write_text(CORPUS)
    os.environ["TRACEKIT_CACHE"] = str(root / "cache")  # fresh caches: key statistics are computed in each run
    records = load_dataset("worldfacts", None, args.points)
    load_start = os.getloadavg()
    rows = []

    model = tracekit.load_model(args.model, device="cpu")
    for kind in args.work:
        with ResultStore(root / f"local-warm-{kind}.sqlite") as store:
            work(kind, model, records[:1], store, str(root / "corpus.txt"))
        with ResultStore(root / f"local-{kind}.sqlite") as store:
            started = time.perf_counter()
            report = work(kind, model, records, store, str(root / "corpus.txt"))
            rows.append(dict(work=kind, executor="local", items=report.computed,
                             seconds=time.perf_counter() - started))
    del model

    started = time.perf_counter()
    worker_cache = str(root / "cache-worker-{worker}")  # as on machines without a shared cache
    with RayExecutor(ModelSource(args.model, device="cpu"), address=args.address, workers=args.workers,
                     worker_env={"TRACEKIT_CACHE": worker_cache}) as pool:
        remote = pool.model
        startup = time.perf_counter() - started
        for kind in args.work:
            with ResultStore(root / f"ray-warm-{kind}.sqlite") as store:  # a point per worker
                work(kind, remote, records[:pool.n_workers], store, str(root / "corpus.txt"))
            before = pool.stats["compute seconds"]
            with ResultStore(root / f"ray-{kind}.sqlite") as store:
                started = time.perf_counter()
                report = work(kind, remote, records, store, str(root / "corpus.txt"))
                seconds = time.perf_counter() - started
            compute = pool.stats["compute seconds"] - before
            rows.append(dict(work=kind, executor=f"ray x{pool.n_workers}", items=report.computed, seconds=seconds,
                             compute_seconds=compute,
                             overhead_per_item=(seconds * pool.n_workers - compute) / max(report.computed, 1)))
    for row in rows:
        row["items_per_s"] = row["items"] / row["seconds"]
    result = dict(model=args.model, points=args.points, workers=args.workers, ray_startup_seconds=startup,
                  cpu=f"{platform.machine()}, {os.cpu_count()} cores", torch_threads_local=torch.get_num_threads(),
                  load_average_start=load_start, load_average_end=os.getloadavg(), rows=rows)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"sweep-{args.model.replace(':', '-').replace('/', '-')}-cpu"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"# Sweep benchmark: {r['model']}, {r['points']} points, local vs Ray ({r['cpu']})", "",
             f"Ray start-up (workers loading the model, in parallel): {r['ray_startup_seconds']:.1f} s, not in the "
             "times below. Local: one process, torch threads "
             f"{r['torch_threads_local']}; Ray: one thread per worker. Each run follows a one-point warm-up "
             "(first calls, ROME's key statistics): the steady state of a long sweep.", "",
             "| work | executor | items | seconds | items/s | overhead per item (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        overhead = f"{row['overhead_per_item']:.4f}" if "overhead_per_item" in row else ""
        lines.append(f"| {row['work']} | {row['executor']} | {row['items']} | {row['seconds']:.2f} | "
                     f"{row['items_per_s']:.2f} | {overhead} |")
    lines += ["", f"Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in r['load_average_start'])}, "
              f"at end {tuple(round(x, 2) for x in r['load_average_end'])}: other work on the machine slows "
              "every figure."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
