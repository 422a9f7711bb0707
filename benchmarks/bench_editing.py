"""Editing benchmark: seconds per ROME / MEMIT / FT-1 / FT-5 edit, key statistics, evaluation.

    python benchmarks/bench_editing.py                 # the bundled SmolLM2-135M (minutes)
    python benchmarks/bench_editing.py --smoke         # tiny random model, seconds (CI)
    python benchmarks/bench_editing.py --model random:gpt-j-6b --dtype bfloat16   # on a GPU

Writes ``benchmarks/results/editing-<model>-<device>.json`` and ``.md``. Per method: the
median wall time of ``--repeats`` edits with warm caches (context templates and key
statistics computed before timing), its parts, and for ROME the same edit through the plain
whole-forward engine (``engine="hooks"``) for the speed-up of the block-driven engine.
Key statistics are timed once, uncached, for one layer from the cached corpus. The sweep
estimate multiplies by the paper's GPT-J study: 652 points x 9 layers per method.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tracekit
from tracekit.editing.covariance import second_moments
from tracekit.editing.presets import memit_preset, rome_preset
from tracekit.editing.memit import apply_memit
from tracekit.editing.request import EditRequest
from tracekit.editing.rome import apply_rome

STUDY_POINTS, STUDY_LAYERS = 652, 9  # Hase et al.: GPT-J known CounterFact points x edit layers
REQUEST = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
POINT = dict(  # one CounterFact-shaped point for the evaluation timing (hand-written)
    prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new=" English", target_true=" French",
    paraphrases=["Danielle Darrieux, a native speaker of", "Danielle Darrieux's mother tongue is"],
    neighbours=["The mother tongue of Jean Marais is", "The mother tongue of Léon Blum is",
                "The native language of Montesquieu is", "Michel Rocard is a native speaker of",
                "The mother tongue of François Bayrou is", "Jacques Chirac is a native speaker of",
                "The native language of Raymond Barre is", "Maurice Genevoix, speaker of",
                "The mother tongue of Albert Camus is", "Édith Piaf is a native speaker of"],
)


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times, result


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fact_record():
    from tracekit.data.records import FactRecord

    fields = {f.name for f in dataclasses.fields(FactRecord)}
    values = dict(case_id=0, prompt=POINT["prompt"], subject=POINT["subject"], target_new=POINT["target_new"],
                  target_true=POINT["target_true"], paraphrase_prompts=tuple(POINT["paraphrases"]),
                  neighborhood_prompts=tuple(POINT["neighbours"]))
    return FactRecord(**{k: v for k, v in values.items() if k in fields})


def bench(args) -> dict:
    model = tracekit.load_model(args.model, dtype=args.dtype)
    report: dict = {"model": args.model, "dtype": args.dtype, "device": device_name(), "smoke": args.smoke,
                    "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "torch": torch.__version__, "repeats": args.repeats, "methods": {}}
    rome_hp, memit_hp = rome_preset(model), memit_preset(model)
    if args.smoke:
        small = dict(mom2_n_samples=16, mom2_sample_tokens=32, mom2_ridge=1e-2, context_lengths=((3, 2), (5, 2)))
        rome_hp, memit_hp = dataclasses.replace(rome_hp, **small), dataclasses.replace(memit_hp, window=3, **small)
    if args.mom2_samples:  # e.g. a GPT-J shape on a GPU: the preset's 100,000 x 1024 tokens is a day of sampling
        stats = dict(mom2_n_samples=args.mom2_samples, mom2_sample_tokens=args.mom2_tokens)
        rome_hp, memit_hp = dataclasses.replace(rome_hp, **stats), dataclasses.replace(memit_hp, **stats)
    layer = args.layer if args.layer is not None else (rome_hp.layer if rome_hp.layer is not None else model.n_layers // 2)
    memit_layer = min(max(layer, memit_hp.window // 2), model.n_layers - 1 - memit_hp.window // 2)
    report.update(layer=layer, memit_layer=memit_layer, rome_hparams=dataclasses.asdict(rome_hp),
                  memit_hparams=dataclasses.asdict(memit_hp))

    # key statistics: corpus (cached) first, then one layer timed without the cache
    started = time.perf_counter()
    second_moments(model, [layer], n_samples=rome_hp.mom2_n_samples, sample_tokens=rome_hp.mom2_sample_tokens,
                   corpus=rome_hp.corpus, progress=not args.quiet)
    report["stats_first_call_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    stats = second_moments(model, [layer], n_samples=rome_hp.mom2_n_samples, sample_tokens=rome_hp.mom2_sample_tokens,
                           corpus=rome_hp.corpus, cache=False, progress=not args.quiet)[layer]
    seconds = time.perf_counter() - started
    report["stats"] = {"layer": layer, "tokens": stats.tokens, "seconds": seconds, "tokens_per_second": stats.tokens / seconds}

    # warm the template cache and the memit layers' statistics, then time edits
    apply_rome(model, REQUEST, layer, rome_hp, progress=False)
    apply_memit(model, REQUEST, memit_layer, memit_hp, progress=False)
    runs = {
        "rome": lambda: apply_rome(model, REQUEST, layer, rome_hp, progress=False),
        "rome (whole-forward engine)": lambda: apply_rome(model, REQUEST, layer, rome_hp, engine="hooks", progress=False),
        "memit": lambda: apply_memit(model, REQUEST, memit_layer, memit_hp, progress=False),
    }
    if args.skip_whole_forward:
        runs.pop("rome (whole-forward engine)")
    try:
        from tracekit.editing.finetune import apply_ft
        from tracekit.editing.presets import ft_preset

        for n in (1, 5):
            if n > model.n_layers:
                continue
            hp = ft_preset(model, "error-injection", n)
            ft_layer = min(max(layer, n // 2), model.n_layers - 1 - (n - 1 - n // 2))
            runs[f"ft-{n}"] = lambda hp=hp, ft_layer=ft_layer: apply_ft(model, REQUEST, ft_layer, hp)
    except ImportError as err:  # the FT module is optional here
        report["ft_missing"] = str(err)
    edits = {}
    for name, run in runs.items():
        repeats = 1 if "whole-forward" in name and not args.smoke else args.repeats
        median, times, edit = timed(run, repeats)
        info = edit.info
        entry = {"seconds": median, "all_seconds": times, "layers": info.layers, "parts": info.seconds}
        if info.steps_taken:
            entry["steps"] = info.steps_taken
            if "v_star" in info.seconds:  # one forward pass per trace entry, a backward per step
                entry["seconds_per_v_step"] = info.seconds["v_star"] / len(info.losses)
        entry["final_nll"] = info.final_nll
        if "delta_norm" in info.details:
            entry["delta_norm"] = info.details["delta_norm"]
        report["methods"][name] = entry
        edits[name] = edit
    if "rome (whole-forward engine)" in report["methods"]:
        fast, slow = report["methods"]["rome"], report["methods"]["rome (whole-forward engine)"]
        report["rome_engine_speedup"] = slow["parts"]["v_star"] / fast["parts"]["v_star"]

    # evaluation of one point (all metric prompts of the point in one batched pass, before and after)
    try:
        from tracekit.editing.metrics import MetricsConfig, evaluate_edit
        from tracekit.editing.problems import prepare

        setup = prepare(model, fact_record(), "error-injection")
        assert setup.request == REQUEST, "the timed edits are this point's Error Injection edits"
        for name, edit in edits.items():  # the first call also samples (and caches) the essence texts
            if "whole-forward" not in name:
                scores = evaluate_edit(model, setup, edit, MetricsConfig()).scores
                report["methods"][name]["scores"] = {k: round(v, 4) for k, v in scores.items() if v == v}
        median, times, scored = timed(lambda: evaluate_edit(model, setup, edits["rome"], MetricsConfig()), args.repeats)
        report["evaluation"] = {"seconds": median, "all_seconds": times, "prompts": len(scored.rows)}
    except (ImportError, TypeError) as err:
        report["evaluation_missing"] = f"{type(err).__name__}: {err}"
    if args.sweep_points:
        report["sweep"] = bench_sweep(model, args, layer)
    eval_seconds = report.get("evaluation", {}).get("seconds", 0.0)
    edits = STUDY_POINTS * STUDY_LAYERS
    report["sweep_estimate"] = {
        "points": STUDY_POINTS, "layers": STUDY_LAYERS, "edits_per_method": edits,
        "hours_per_method_on_this_model_and_device": {
            name: round(edits * (entry["seconds"] + eval_seconds) / 3600, 2)
            for name, entry in report["methods"].items()},
    }
    return report


def bench_sweep(model, args, layer: int) -> dict:
    """ROME edit + scoring per (point, layer) in a real sweep (``edit_study``, the presets, essence
    on): ``--sweep-points`` built-in facts x 2 layers, item by item and with each ``--sweep-batch``.
    A one-point sweep first warms the caches (templates, statistics), as in a long sweep. Runs
    against an older tracekit too (no ``batch`` argument: item by item only)."""
    import inspect

    from tracekit.data.loaders import load_dataset
    from tracekit.store import ResultStore
    from tracekit.studies import edit_study

    layers = sorted({layer, min(layer + 3, model.n_layers - 1)})
    records = load_dataset("worldfacts", None, args.sweep_points + 1)
    batched = "batch" in inspect.signature(edit_study).parameters
    out = {"points": args.sweep_points, "layers": layers, "runs": {}}
    folder = Path(tempfile.mkdtemp(prefix="tracekit-bench-sweep-"))
    edit_study(model, records[:1], ResultStore(folder / "warm.sqlite"), methods=("rome",), layers=layers,
               progress=False)
    for batch in [1] + ([b for b in args.sweep_batch if b > 1] if batched else []):
        store = ResultStore(folder / f"batch{batch}.sqlite")
        started = time.perf_counter()
        report = edit_study(model, records[1:], store, methods=("rome",), layers=layers, progress=False,
                            **({"batch": batch} if batched else {}))
        seconds = time.perf_counter() - started
        items = report.computed + report.skipped
        out["runs"][str(batch)] = {"items": items, "skipped": report.skipped, "failed": len(report.failed),
                                   "seconds": seconds, "seconds_per_item": seconds / max(items, 1),
                                   "items_per_second": items / seconds}
    return out


def markdown(report: dict) -> str:
    lines = [f"# Editing benchmark: {report['model']} ({report['dtype']}) on {report['device']}", "",
             f"ROME layer {report['layer']}, MEMIT centre {report['memit_layer']}; median of {report['repeats']} edits, "
             "warm caches.", "", "| method | seconds / edit | v* seconds / step | layers |", "| --- | ---: | ---: | --- |"]
    for name, entry in report["methods"].items():
        step = entry.get("seconds_per_v_step")
        lines.append(f"| {name} | {entry['seconds']:.2f} | {'' if step is None else f'{step:.3f}'} | {entry['layers']} |")
    stats = report["stats"]
    scored = {name: entry["scores"] for name, entry in report["methods"].items() if "scores" in entry}
    if scored:
        keys = ["rewrite", "paraphrase", "neighborhood", "overall", "essence"]
        lines += ["", f"Scores on the timed edit ({POINT['subject']}: {POINT['target_true']!r} -> {POINT['target_new']!r}, "
                  "hand-written paraphrases and neighbours; first-token probabilities):", "",
                  "| method | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        lines += [f"| {name} | " + " | ".join(f"{s.get(k, float('nan')):.3f}" for k in keys) + " |" for name, s in scored.items()]
    lines.append("")
    if "rome_engine_speedup" in report:
        lines.append(f"- block-driven v* engine vs whole forward passes: {report['rome_engine_speedup']:.1f}x")
    lines += [f"- key statistics, layer {stats['layer']}: {stats['tokens']:,} tokens in {stats['seconds']:.1f} s "
              f"({stats['tokens_per_second']:,.0f} tokens/s); first call incl. any corpus sampling: "
              f"{report['stats_first_call_seconds']:.1f} s"]
    if "evaluation" in report:
        ev = report["evaluation"]
        lines.append(f"- evaluation of one point ({ev['prompts']} scored prompt/object pairs + essence texts, "
                     f"before and after): {ev['seconds']:.2f} s")
    if "sweep" in report:
        sw = report["sweep"]
        lines += ["", f"ROME edit + scoring per (point, layer) in a sweep (edit_study, presets, essence on): "
                  f"{sw['points']} built-in facts x layers {sw['layers']}, warm caches:", "",
                  "| batch | items | seconds / item | items / s |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {b} | {r['items']} | {r['seconds_per_item']:.2f} | {r['items_per_second']:.3f} |"
                  for b, r in sw["runs"].items()]
    sweep = report["sweep_estimate"]
    lines += ["", f"Sweep estimate, the paper's GPT-J study size ({sweep['points']} points x {sweep['layers']} layers "
              f"= {sweep['edits_per_method']:,} edits per method, edit + evaluation), on this model and device:", ""]
    lines += [f"- {name}: {hours} h" for name, hours in sweep["hours_per_method_on_this_model_and_device"].items()]
    lines += ["", "For scale: the paper reports about 8 hours per method for its GPT-J sweep (8 layers) on one A6000.",
              f"Load average (1, 5, 15 min) at start {report.get('load_average_at_start')}, "
              f"at end {report.get('load_average_at_end')}: other work on the machine slows every figure."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="tracekit editing benchmark")
    parser.add_argument("--model", default=None, help="default: smollm2-135m (random:llama-tiny with --smoke)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny statistics: seconds")
    parser.add_argument("--mom2-samples", type=int, default=None, help="override the preset's statistics samples")
    parser.add_argument("--mom2-tokens", type=int, default=128, help="tokens per statistics sample (with --mom2-samples)")
    parser.add_argument("--sweep-points", type=int, default=0,
                        help="also time ROME edit + scoring per item in a sweep over this many points x 2 layers")
    parser.add_argument("--sweep-batch", type=int, nargs="+", default=[4], help="batch sizes for --sweep-points")
    parser.add_argument("--skip-whole-forward", action="store_true", help="skip the slow whole-forward ROME run")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        args.model = "random:llama-tiny" if args.smoke else "smollm2-135m"
    if args.smoke:
        args.repeats = 1
        os.environ["TRACEKIT_CACHE"] = tempfile.mkdtemp(prefix="tracekit-bench-")  # leave the user's cache alone
    report = bench(args)
    report["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stem = f"editing-{args.model.replace(':', '_').replace('/', '_')}-{device}{'-smoke' if args.smoke else ''}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
