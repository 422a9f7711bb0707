"""GPU quick check (issue 11): tracing and editing at the paper's scale, in one time-limited run.

    bash benchmarks/run.sh --gpu-quick              # a CUDA machine: the GPT-J-6B shape in bfloat16
    python benchmarks/gpu_quick.py --smoke          # a CPU, a tiny model, seconds (what the tests run)

Stages, each skipped (and said so) when the time left is short, each written to the report
the moment it ends, so a run stopped at its limit keeps what it measured:
  1. device: name, versions, datasheet and measured matrix-product peaks, which optional
     packages exist (the hf path needs no transformer-lens, nnsight or gguf);
  2. load: the model straight onto the device in its dtype;
  3. tracing: 20 prompts of 20 distinct token lengths through ``trace_many`` (rows of all of
     them packed into shared passes, bucketed shapes), once cold (every shape first seen)
     and once warm; the naive loop on 3 of them; ratio, work bound, achieved TFLOP/s and
     fraction of peak, padding, attention shapes, max |difference|; the 652-prompt estimate;
  4. editing: ROME, MEMIT, FT-1, FT-5 through today's editors (small key statistics: a
     benchmark, not a replication), seconds per edit and its parts; the key statistics'
     factorisations made (once per layer); ROME over --edit-batch requests with batched v*;
     mass MEMIT over them in one edit;
  5. a sweep as a study runs it: --sweep-points points x 9 layers (edit-sweep's --layers auto),
     key statistics first, ROME, MEMIT, FT-1 and FT-5 with --edit-batch points edited together
     (batched v*, shared FT passes, batched scoring), ROME one point at a time; the 652 x 9
     sweep estimates.
Everything goes to one folder: report.json, report.md (both name the device), log.txt.

Carrying what the GPU machine lacks (it has no internet; torch and transformers are there):
tracekit itself travels with the working tree. Run from the repository root with
``PYTHONPATH=.``; ``rich``, ``numpy``, ``safetensors``, ``tokenizers`` are on the image.
A missing pure-Python package travels as a wheel: here,
``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl NAME==VERSION``
(add ``--platform manylinux_2_28_x86_64`` etc. for compiled ones), carry ``.whl``, and there
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export
PYTHONPATH=/tmp/site:.`` before this script. ``run.sh --gpu-quick`` needs no wheels.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tracekit  # noqa: E402
from bench_tracing import PROMPTS, executed_flops, flop_model, work  # noqa: E402
from device import datasheet_peak, device_name, fraction, measured_peak  # noqa: E402
from gpu_report import STUDY_LAYERS, STUDY_POINTS, markdown  # noqa: E402
from tracekit.adapters.partial import collect_stats  # noqa: E402
from tracekit.tracing import naive_trace, trace_many  # noqa: E402

STUDY_PROMPTS = 652  # the paper's traced prompts; STUDY_POINTS x STUDY_LAYERS: its editing sweep
FILLER = ("Here is a short fact about the world worth knowing well , so read it and then tell me about it"
          " now please , thank you very much my friend").split()


class Run:
    """The report, the log and the clock of one run."""

    def __init__(self, out: Path, limit: float):
        self.out, self.limit, self.started = out, limit, time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.report: dict = {"device": device_name(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "time_limit_s": limit, "stages": {}}
        self.logfile = open(out / "log.txt", "a")

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.started)

    def log(self, text: str) -> None:
        line = f"[{time.perf_counter() - self.started:7.1f}s] {text}"
        print(line, flush=True)
        self.logfile.write(line + "\n")
        self.logfile.flush()

    def stage(self, name: str, needs: float, fn) -> dict | None:
        """Run ``fn()`` if at least ``needs`` seconds are left; record its result, error or skip."""
        if self.left() < needs:
            self.report["stages"][name] = {"skipped": f"{self.left():.0f} s left, the stage needs ~{needs:.0f} s"}
            self.log(f"{name}: skipped (time)")
            self.save()
            return None
        self.log(f"{name} ...")
        started = time.perf_counter()
        try:
            result = fn()
            result["stage_seconds"] = time.perf_counter() - started
        except Exception as err:  # a benchmark keeps going and says what broke
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:],
                      "stage_seconds": time.perf_counter() - started}
            self.log(f"{name}: FAILED {result['error']}")
        self.report["stages"][name] = result
        self.save()
        return result

    def save(self) -> None:
        self.report["elapsed_s"] = time.perf_counter() - self.started
        (self.out / "report.json").write_text(json.dumps(self.report, indent=1, default=_plain))
        (self.out / "report.md").write_text(markdown(self.report))


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    """The GPU memory PyTorch held at most since the last reset, in GiB (None on a CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def clocked(fn):
    sync()
    started = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - started, result


# ---- stages -----------------------------------------------------------------------------------
def stage_device(args) -> dict:
    optional = {name: _importable(name) for name in ("transformer_lens", "nnsight", "gguf")}
    import transformers

    out = {"device": device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": sys.version.split()[0], "optional_packages_present": optional, "dtype": args.dtype,
           "datasheet_peak_flops": datasheet_peak(args.dtype),
           "measured_matmul_flops": measured_peak(args.dtype, size=None if torch.cuda.is_available() else 256,
                                                  repeats=5 if args.smoke else 10)}
    if torch.cuda.is_available():
        out["cudnn_sdp_enabled"] = torch.backends.cuda.cudnn_sdp_enabled()
        out["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return out


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def distinct_length_prompts(model, n: int) -> list[tuple[str, str]]:
    """``n`` prompts of ``n`` distinct token lengths: the benchmark's facts behind 0..k filler words."""
    seen, out = set(), []
    for i in range(n):
        prompt, subject = PROMPTS[i % len(PROMPTS)]
        words = 0
        while True:
            text = " ".join([*FILLER[:words], prompt]) if words else prompt
            length = len(model.tokens(text))
            if length not in seen or words >= len(FILLER):
                break
            words += 1
        seen.add(length)
        out.append((text, subject))
    return out


def stage_tracing(run: Run, model, args) -> dict:
    prompts = distinct_length_prompts(model, args.prompts)
    lengths = [len(model.tokens(p)) for p, _ in prompts]
    kw = dict(kind="mlp", window=min(args.window, model.n_layers), samples=args.samples, seed=0)
    fm = flop_model(model)
    works = [work(fm, T, kw["window"], kw["samples"]) for T in lengths]
    out: dict = {"settings": kw, "prompt_lengths": lengths, "shapes": args.shapes, "pack": len(prompts)}
    results = {}
    for label in ("cold", "warm"):
        if label == "warm" and run.left() < 1.5 * out["cold"]["seconds"] + 60:
            out["warm"] = {"skipped": "time"}
            continue
        with collect_stats() as stats:
            seconds, traced = clocked(lambda: [r for _, r in trace_many(
                model, prompts, batch=len(prompts), progress=False, shapes=args.shapes, **kw)])
        results[label] = traced
        useful = sum(m for _, m in works) / seconds
        executed = executed_flops(fm, stats) / seconds
        out[label] = {"seconds": seconds, "seconds_per_prompt": seconds / len(prompts),
                      "useful_tflops": useful / 1e12, "executed_tflops": executed / 1e12,
                      "padding": stats.padding, "block_calls": stats.block_calls,
                      "attention_shapes": len(stats.attention)}
        run.log(f"  tracing {label}: {seconds:.1f} s for {len(prompts)} prompts, {useful / 1e12:.1f} TFLOP/s useful, "
                f"padding {100 * stats.padding:.0f}%, {len(stats.attention)} attention shapes")
    # naive loop on 3 prompts of middle lengths (the shortest ones in a smoke run)
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    picks = order[:args.naive] if args.smoke else [order[len(order) * k // (args.naive + 1)]
                                                   for k in range(1, args.naive + 1)]
    naive_seconds, naive_flops, diffs = 0.0, 0.0, []
    for i in picks:
        if run.left() < 30:
            break
        seconds, ref = clocked(lambda: naive_trace(model, *prompts[i], **kw))
        naive_seconds += seconds
        naive_flops += works[i][0]
        diff = float((results["cold"][i].p_restore - ref.p_restore).abs().max())
        diffs.append({"tokens": lengths[i], "seconds": seconds, "max_abs_diff": diff,
                      "p_clean": ref.p_clean, "p_noise": ref.p_noise})
        run.log(f"  naive loop, {lengths[i]} tokens: {seconds:.1f} s, max diff {diff:.1e}")
    out["naive"] = diffs
    if diffs:
        naive_rate = naive_flops / naive_seconds
        all_naive = sum(n for n, _ in works) / naive_rate
        bound = sum(n for n, _ in works) / sum(m for _, m in works)
        out.update(naive_tflops=naive_rate / 1e12, work_bound=bound, naive_seconds_all_estimated=all_naive,
                   max_abs_diff=max(d["max_abs_diff"] for d in diffs))
        peak, measured = run.report["stages"].get("device", {}).get("datasheet_peak_flops"), \
            run.report["stages"].get("device", {}).get("measured_matmul_flops")
        out["naive_fraction_of_peak"] = fraction(naive_rate, peak)
        out["naive_fraction_of_measured_peak"] = fraction(naive_rate, measured)
        for label in ("cold", "warm"):
            if "seconds" in out.get(label, {}):
                entry = out[label]
                entry["ratio"] = all_naive / entry["seconds"]
                entry["efficiency"] = entry["ratio"] / bound
                entry["fraction_of_peak"] = fraction(entry["useful_tflops"] * 1e12, peak)
                entry["fraction_of_measured_peak"] = fraction(entry["useful_tflops"] * 1e12, measured)
    best = out.get("warm", {}).get("seconds_per_prompt") or out["cold"]["seconds_per_prompt"]
    out["study_estimate_minutes"] = STUDY_PROMPTS * best / 60
    if args.profile and run.left() > 60:
        out["profile"] = profile_tracing(run, model, prompts[: args.profile], kw, args)
    return out


def profile_tracing(run: Run, model, prompts, kw, args) -> dict:
    """torch.profiler over one warm ``trace_many`` of ``prompts``: the operators and kernels that
    take the time, written to profile.txt (where the engine's two-thirds of peak goes)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        seconds, _ = clocked(lambda: list(trace_many(model, prompts, batch=len(prompts), progress=False,
                                                     shapes=args.shapes, **kw)))
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
    (run.out / "profile.txt").write_text(f"{len(prompts)} prompts, {kw}, {seconds:.2f} s\n\n{table}\n")
    run.log(f"  profile of {len(prompts)} prompts: {seconds:.1f} s, operators in profile.txt")
    return {"prompts": len(prompts), "seconds": seconds, "file": "profile.txt"}


def edit_hparams(model, args):
    from tracekit.editing.presets import ft_preset
    from tracekit.editing.presets import memit_preset, rome_preset

    stats = dict(mom2_n_samples=args.mom2_samples, mom2_sample_tokens=args.mom2_tokens, mom2_ridge=1e-2)
    rome, memit = rome_preset(model), memit_preset(model)
    ft = {n: ft_preset(model, "error-injection", n) for n in (1, 5)}
    if args.smoke:  # the code paths, not the numbers: a few steps each
        stats.update(context_lengths=((3, 2), (5, 2)), v_num_grad_steps=3)
        memit = dataclasses.replace(memit, window=min(memit.window, 3))
        ft = {n: dataclasses.replace(hp, steps=3) for n, hp in ft.items()}
    rome, memit = dataclasses.replace(rome, **stats), dataclasses.replace(memit, **stats)
    return {"rome": rome, "memit": memit, "ft-1": ft[1], "ft-5": ft[5]}


def stage_editing(run: Run, model, args) -> dict:
    from bench_editing import REQUEST
    from tracekit.editing import factors
    from tracekit.editing.api import warm_key_statistics
    from tracekit.editing.finetune import apply_ft
    from tracekit.editing.memit import apply_memit, apply_memit_mass
    from tracekit.editing.rome import apply_rome, rome_edits

    hparams = edit_hparams(model, args)
    L = model.n_layers
    layer = min(hparams["rome"].layer if hparams["rome"].layer is not None else L // 2, L - 3)
    half = hparams["memit"].window // 2
    memit_layer = min(max(layer, half), L - 1 - half)
    ft_layer = {n: min(max(layer, n // 2), L - 1 - (n - 1 - n // 2)) for n in (1, 5)}
    runs = {
        "rome": lambda: apply_rome(model, REQUEST, layer, hparams["rome"], progress=False),
        "memit": lambda: apply_memit(model, REQUEST, memit_layer, hparams["memit"], progress=False),
        "ft-1": lambda: apply_ft(model, REQUEST, ft_layer[1], hparams["ft-1"]),
        "ft-5": lambda: apply_ft(model, REQUEST, ft_layer[5], hparams["ft-5"]),
    }
    if L < 5:
        runs.pop("ft-5")
    out: dict = {"layer": layer, "memit_layer": memit_layer, "mom2_samples": args.mom2_samples,
                 "mom2_tokens": args.mom2_tokens, "methods": {}}
    seconds, _ = clocked(lambda: warm_key_statistics(model, ["rome", "memit"], [layer, memit_layer],
                                                     hparams["memit"], progress=False))
    out["key_statistics_seconds"] = seconds
    run.log(f"  key statistics: {seconds:.1f} s (corpus sampled from the model, then {args.mom2_samples} x "
            f"{args.mom2_tokens} tokens)")
    made = dict(factors.FACTORISATIONS)
    for method, fn in runs.items():
        if run.left() < 45:
            out["methods"][method] = {"skipped": "time"}
            continue
        first, _ = clocked(fn)  # the first call fills the caches (context templates, the statistics' factors)
        seconds, edit = clocked(fn)
        parts = edit.info.seconds
        out["methods"][method] = {"seconds": seconds, "first_call_seconds": first, "parts": parts,
                                  "steps": edit.info.steps_taken, "layers": edit.info.layers}
        run.log(f"  {method}: {seconds:.2f} s per edit (first call {first:.1f} s), parts {parts}")
    # the key statistics' factorisation: made once per layer, however many edits read it
    out["factorisations"] = {str(x): n - made.get(x, 0) for x, n in factors.FACTORISATIONS.items() if n > made.get(x, 0)}
    run.log(f"  key-statistics factorisations made (layer: count): {out['factorisations']}")
    # batched requests: k requests' v* in one pass per step, and mass MEMIT (all k keys in one update)
    requests = batch_requests(args.edit_batch)
    if run.left() > 60 and len(requests) > 1:
        seconds, edits = clocked(lambda: rome_edits(model, requests, layer, hparams["rome"], progress=False,
                                                    batch=len(requests)))
        out["rome_batched"] = {"requests": len(requests), "seconds": seconds, "seconds_per_request": seconds / len(requests),
                               "v_star_seconds_per_request": statistics.mean(e.info.seconds["v_star"] for e in edits)}
        run.log(f"  rome, {len(requests)} requests batched: {seconds:.2f} s ({seconds / len(requests):.2f} s per request)")
    if run.left() > 60 and len(requests) > 1:
        seconds, edit = clocked(lambda: apply_memit_mass(model, requests, memit_layer, hparams["memit"], progress=False,
                                                         batch=len(requests)))
        out["memit_mass"] = {"requests": len(requests), "seconds": seconds, "parts": edit.info.seconds}
        run.log(f"  mass memit, {len(requests)} requests in one edit: {seconds:.2f} s")
    return out


def batch_requests(n: int) -> list:
    """``n`` Error Injection requests from the built-in facts (the timed REQUEST first)."""
    from bench_editing import REQUEST
    from tracekit.data.loaders import load_dataset
    from tracekit.editing.request import EditRequest

    facts = load_dataset("worldfacts")
    return [REQUEST] + [EditRequest.from_record(r) for r in facts[: max(0, n - 1)]]


def stage_sweep(run: Run, model, args) -> dict:
    """Edit + score per (point, layer) as a study runs it: every point over the same spread of
    layers as ``edit-sweep --layers auto`` (so each point's one-off work, its "before" pass and
    essence texts, is shared by its layers as in a study), the key statistics computed first
    (a study computes them once per layer; timed apart). Every method edits ``--edit-batch``
    points together (v* of ROME and MEMIT batched, FT's passes shared: ``finetune_batch``); then
    ROME one point at a time (batch 1) on a quarter of the points, the gain's baseline. The
    estimates scale the per-item time to the paper's 652 x 9 sweep."""
    from tracekit.data.loaders import load_dataset
    from tracekit.editing.api import edit_many, warm_key_statistics
    from tracekit.editing.metrics import MetricsConfig
    from tracekit.studies.executors import preset_layer
    from tracekit.studies.study import spread_layers

    hparams = edit_hparams(model, args)
    metrics = MetricsConfig(essence=not args.smoke)
    records = load_dataset("worldfacts")[: args.sweep_points]
    layers = spread_layers(model.n_layers, args.sweep_layers - 1, preset_layer(model))[: args.sweep_layers]
    out: dict = {"points": len(records), "layers": layers, "batch": args.edit_batch, "methods": {}}
    seconds, _ = clocked(lambda: [warm_key_statistics(model, [m], layers, hparams[m], progress=False, clip_window=True)
                                  for m in ("rome", "memit") if m in args.sweep_methods])
    out["key_statistics_seconds"] = seconds
    run.log(f"  key statistics for layers {layers} (ROME, MEMIT): {seconds:.1f} s")
    plan = [(method, records, args.edit_batch) for method in ("rome", "memit", "ft-1", "ft-5")]
    plan.append(("rome", records[:max(1, len(records) // 4)], 1))
    for method, points, batch in plan:
        label = method if batch > 1 else f"{method}, batch 1"
        if method not in args.sweep_methods:
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        done, total, per_layer, error = 0, 0.0, {}, None
        for layer in layers:
            if run.left() < 30:
                break
            try:
                seconds, results = clocked(lambda: edit_many(model, points, method, layer=layer, hparams=hparams[method],
                                                             metrics=metrics, batch=batch, clip_window=True))
                failed = [r for r in results if isinstance(r, Exception)]
                if failed:
                    raise RuntimeError(f"{method} at layer {layer}: {failed[0]}")
            except Exception as err:  # the other methods' numbers stay (an OOM here once lost ROME's)
                error = f"{type(err).__name__} at layer {layer}: {str(err)[:300]}"
                run.log(f"  sweep {label}: FAILED {error}")
                out["methods"][label] = {"points": len(points), "batch": batch, "error": error, "peak_gpu_gib": peak_gib()}
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                break
            total, done, per_layer[layer] = total + seconds, done + len(points), seconds / len(points)
        if error or not done:
            continue
        complete = len(per_layer) == len(layers)
        per = total / done
        out["methods"][label] = {"points": len(points), "batch": batch, "items": done, "complete": complete,
                                 "per_point_layer_seconds": per, "per_layer_seconds_per_point": per_layer,
                                 "study_sweep_hours": STUDY_POINTS * STUDY_LAYERS * per / 3600 if complete else None,
                                 "peak_gpu_gib": peak_gib()}
        run.log(f"  sweep {label}: {len(points)} points x {len(per_layer)} layers, {per:.2f} s per (point, layer)"
                + (f" -> {STUDY_POINTS} x {STUDY_LAYERS} sweep {STUDY_POINTS * STUDY_LAYERS * per / 3600:.2f} h"
                   if complete else " (stopped by the time limit: no estimate)"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: random:gpt-j-6b on CUDA, random:gptj-tiny otherwise")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 otherwise")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few prompts, tiny statistics: seconds on a CPU")
    parser.add_argument("--time-limit", type=float, default=470.0, help="seconds for the whole run; default: %(default)s")
    parser.add_argument("--prompts", type=int, default=20, help="traced prompts, of distinct lengths")
    parser.add_argument("--naive", type=int, default=3, help="prompts the naive loop runs on")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--shapes", choices=["exact", "bucketed"], default="bucketed")
    parser.add_argument("--mom2-samples", type=int, default=64, help="key-statistics samples (benchmark-sized)")
    parser.add_argument("--mom2-tokens", type=int, default=128)
    parser.add_argument("--sweep-points", type=int, default=16,
                        help="points of the sweep stage (worldfacts)")
    parser.add_argument("--sweep-layers", type=int, default=9, help="layers per point, spread as --layers auto")
    parser.add_argument("--sweep-methods", nargs="+", default=["rome", "memit", "ft-1", "ft-5"],
                        choices=["rome", "memit", "ft-1", "ft-5"], help="the sweep stage's methods")
    parser.add_argument("--edit-batch", type=int, default=None,
                        help="requests / points edited together in the batched runs; default: 16 on CUDA, 4 otherwise")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the tracing stage, profile one warm trace of N prompts (profile.txt)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tracing", "editing", "sweep"])
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results/gpu-quick-<device>-<time>")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke:
        args.model = args.model or "random:gptj-tiny"
        args.prompts, args.naive, args.samples, args.window = min(args.prompts, 4), min(args.naive, 1), 2, 3
        args.mom2_samples, args.mom2_tokens, args.sweep_points, args.sweep_layers = 16, 32, 4, 3
        args.edit_batch = args.edit_batch or 2
        os.environ["TRACEKIT_CACHE"] = tempfile.mkdtemp(prefix="tracekit-gpu-quick-")  # leave the user's cache alone
    args.model = args.model or ("random:gpt-j-6b" if cuda else "random:gptj-tiny")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.edit_batch = args.edit_batch or (16 if cuda else 4)
    slug = "".join(c if c.isalnum() else "-" for c in device_name()).strip("-").lower()[:40]
    out = Path(args.out_dir or f"benchmarks/results/gpu-quick-{slug}-{time.strftime('%Y%m%d-%H%M')}")
    run = Run(out, args.time_limit)
    run.report.update(model=args.model, dtype=args.dtype, smoke=args.smoke, arguments=vars(args))
    run.stage("device", 0, lambda: stage_device(args))
    loaded = {}

    def load():
        seconds, model = clocked(lambda: tracekit.load_model(args.model, dtype=args.dtype))
        loaded["model"] = model
        return {"seconds": seconds, "layers": model.n_layers, "d_model": model.d_model,
                "forward_path": model.forward_path, "device": str(model.device)}

    run.stage("load", 30, load)
    if "model" in loaded:
        model = loaded["model"]
        if "tracing" not in args.skip:
            run.stage("tracing", 60, lambda: stage_tracing(run, model, args))
        if "editing" not in args.skip:
            run.stage("editing", 60, lambda: stage_editing(run, model, args))
        if "sweep" not in args.skip:
            run.stage("sweep", 45, lambda: stage_sweep(run, model, args))
    run.save()
    print(markdown(run.report))
    print(f"wrote {out}/report.json, report.md and log.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
