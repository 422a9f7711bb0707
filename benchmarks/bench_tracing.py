"""Tracing benchmark: the batched tracer vs the naive one-pass-per-(token, layer) loop.

    python benchmarks/bench_tracing.py                      # bundled SmolLM2-135M (long on a CPU)
    python benchmarks/bench_tracing.py --smoke              # tiny random model, seconds (CI)
    python benchmarks/bench_tracing.py --naive-prompts 3    # naive loop on 3 of the 20 batch prompts
    python benchmarks/bench_tracing.py --pack 20            # trace_many packs the 20 prompts' rows together

Cases: one prompt (~12 tokens) and a batch of 20 prompts; MLP, window 10, 10 samples,
every token x every layer. For each prompt the two tracers run back to back (order
alternating), so drifting machine load hits both alike. Reported per case: time ratio
(naive / batched), prompts/s and restorations/s of each, max |p_restore difference|,
peak memory of each, and the *work bound*: FLOPs of the naive loop / FLOPs of the
minimal computation (layers from the first restored one, positions from the restored
token, logits at the last position only, plus one clean and one corrupted run). The
batched tracer cannot beat the bound by skipping work, so ``efficiency = ratio / bound``
says how close it runs to the hardware rate the naive loop gets. With CUDA the
GPT-J-6B shape (random weights, bfloat16) is run too. Writes JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tracekit  # noqa: E402
from device import datasheet_peak, device_name, fraction, measured_peak  # noqa: E402
from tracekit.adapters.partial import collect_stats  # noqa: E402
from tracekit.tracing import naive_trace, trace, trace_many, window_layers  # noqa: E402

PROMPTS = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Michael Jordan is a professional player of", "Michael Jordan"),
    ("The Colosseum is located in the city of", "The Colosseum"),
    ("Steve Jobs was the co-founder of the company", "Steve Jobs"),
    ("The Space Needle is located in the city of", "The Space Needle"),
    ("Barack Obama was born in the state of", "Barack Obama"),
    ("Albert Einstein is famous for the theory of", "Albert Einstein"),
    ("The capital city of the country Japan is", "Japan"),
    ("Microsoft was founded by the American businessman", "Microsoft"),
    ("Mount Everest is located on the border of Nepal and", "Mount Everest"),
    ("Pablo Picasso was a famous painter from the country of", "Pablo Picasso"),
    ("The Great Wall is located in the country of", "The Great Wall"),
    ("The official language of the country Brazil is", "Brazil"),
    ("The Statue of Liberty is located in the city of", "The Statue of Liberty"),
    ("Lionel Messi plays professional football for the country", "Lionel Messi"),
    ("The Louvre museum is located in the city of", "The Louvre"),
    ("William Shakespeare wrote his plays in the language", "William Shakespeare"),
    ("The Amazon river flows through the country of", "The Amazon river"),
    ("Big Ben is a famous clock tower in the city of", "Big Ben"),
]
STUDY_PROMPTS = 652  # GPT-J known CounterFact points in the paper


# ---- work model (FLOPs) -------------------------------------------------------------
def flop_model(model) -> dict:
    block = model.adapter.module(model.hf, tracekit.adapters.Site("resid", 0))
    params = sum(p.numel() for p in block.parameters() if p.ndim == 2)
    return {"block_params": params, "d_model": model.d_model, "vocab": model.hf.config.vocab_size,
            "n_layers": model.n_layers}


def _layer_flops(fm: dict, first: int, end: int) -> float:
    """One layer for query positions first..end-1 (causal attention over 0..p)."""
    n = end - first
    attention = 4 * fm["d_model"] * sum(p + 1 for p in range(first, end))
    return 2 * fm["block_params"] * n + attention


def work(fm: dict, T: int, window: int, samples: int) -> tuple[float, float]:
    """(naive FLOPs, minimal FLOPs) to trace every token x layer of a T-token prompt."""
    L, unembed = fm["n_layers"], 2 * fm["d_model"] * fm["vocab"]
    full_pass = L * _layer_flops(fm, 0, T)
    naive = (T * L + 1) * (samples + 1) * (full_pass + T * unembed)  # + the no-restore pass
    minimal = (1 + samples) * (full_pass + unembed)  # one clean, one corrupted run
    for t in range(T):
        per_pos = _layer_flops(fm, t, T)
        for layer in range(L):
            first = window_layers(layer, window, L).start
            minimal += samples * ((L - first) * per_pos + unembed)
    return naive, minimal


# ---- measurement -----------------------------------------------------------------------
def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib(device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def timed(fn, device):
    """(wall seconds, process CPU seconds, peak MiB, result)."""
    reset_peak(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, peak_mib(device), result


def executed_flops(fm: dict, stats) -> float:
    """FLOPs the blocks path ran: padded rows x columns, attention over every key column, and the
    unembedding of every position whose logits were asked for."""
    total = 2.0 * fm["d_model"] * fm["vocab"] * stats.logits
    for (rows, cols, keys), calls in stats.attention.items():
        total += calls * (2 * fm["block_params"] * rows * cols + 4 * fm["d_model"] * rows * cols * keys)
    return total


def run_case(model, name, prompts, naive_count, kw, clock, log, pack: int = 1, shapes: str | None = None,
             peaks: dict | None = None) -> dict:
    """Time the batched tracer and the naive loop on ``prompts`` (naive on the first ``naive_count``).
    ``pack`` 1: prompt by prompt, the two tracers back to back (order alternating); else
    ``trace_many`` over all prompts, ``pack`` at a time, then the naive loop."""
    device = model.device
    fm = flop_model(model)
    rows = []
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)  # noqa: E731
    with collect_stats() as stats:
        if pack > 1:
            wall, cpu, peak, out = timed(lambda: [r for _, r in trace_many(
                model, prompts, batch=pack, progress=False, shapes=shapes, **kw)], device)
            packed = {"seconds": cpu if clock == "cpu" else wall, "wall": wall, "cpu": cpu, "peak_mib": peak}
        for i, (prompt, subject) in enumerate(prompts):
            row = {"prompt": prompt}
            if pack > 1:
                row["batched"] = {"p_restore": out[i].p_restore}
                order = [("naive", lambda: naive_trace(model, prompt, subject, **kw))]
            else:
                batched = lambda: trace(model, prompt, subject, shapes=shapes, **kw)  # noqa: E731
                naive = lambda: naive_trace(model, prompt, subject, **kw)  # noqa: E731
                order = [("batched", batched), ("naive", naive)] if i % 2 == 0 else [("naive", naive), ("batched", batched)]
            for label, fn in order:
                if label == "naive" and i >= naive_count:
                    continue
                if label == "naive":
                    with collect_stats():  # keep the naive loop out of the batched tracer's counts
                        wall, cpu, peak, result = timed(fn, device)
                else:
                    wall, cpu, peak, result = timed(fn, device)
                row[label] = {"seconds": cpu if clock == "cpu" else wall, "wall": wall, "cpu": cpu, "peak_mib": peak,
                              "p_restore": result.p_restore}
            sync()
            T = len(model.tokens(prompt))
            row["tokens"], row["restorations"] = T, T * model.n_layers
            row["naive_flops"], row["minimal_flops"] = work(fm, T, kw["window"], kw["samples"])
            if "naive" in row:
                row["max_abs_diff"] = float((row["batched"]["p_restore"] - row["naive"]["p_restore"]).abs().max())
            timing = f", batched {row['batched']['seconds']:.2f}s" if "seconds" in row["batched"] else ""
            log(f"  {name} {i + 1}/{len(prompts)}: {T} tokens{timing}"
                + (f", naive {row['naive']['seconds']:.2f}s, diff {row['max_abs_diff']:.1e}" if "naive" in row else ""))
            rows.append(row)
    both = [r for r in rows if "naive" in r]
    t_naive = sum(r["naive"]["seconds"] for r in both)
    naive_rate = sum(r["naive_flops"] for r in both) / t_naive  # FLOP/s
    if pack > 1:
        t_batched_all, wall_batched_all = packed["seconds"], packed["wall"]
        measured = rows  # the batched time covers every prompt: compare with the naive loop's extrapolation
        t_naive_all = sum(r["naive_flops"] for r in rows) / naive_rate
        ratio = t_naive_all / t_batched_all
        wall_naive_rate = sum(r["naive_flops"] for r in both) / sum(r["naive"]["wall"] for r in both)
        wall_ratio = sum(r["naive_flops"] for r in rows) / wall_naive_rate / wall_batched_all
        batched_peak = packed["peak_mib"]
    else:
        t_batched_all = sum(r["batched"]["seconds"] for r in rows)
        measured = both
        t_batched = sum(r["batched"]["seconds"] for r in both)
        t_naive_all = t_naive / t_batched * t_batched_all
        ratio = t_naive / t_batched
        wall_ratio = sum(r["naive"]["wall"] for r in both) / sum(r["batched"]["wall"] for r in both)
        batched_peak = max((r["batched"]["peak_mib"] or 0) for r in rows)
    t_batched_measured = t_batched_all if pack > 1 else sum(r["batched"]["seconds"] for r in both)
    bound = sum(r["naive_flops"] for r in measured) / sum(r["minimal_flops"] for r in measured)
    cells = lambda rs: sum(r["restorations"] for r in rs)  # noqa: E731
    useful = sum(r["minimal_flops"] for r in measured) / t_batched_measured
    executed = executed_flops(fm, stats) / t_batched_all if stats.block_calls else None
    peaks = peaks or {}
    return {
        "case": name, "clock": clock, "prompts": len(rows), "naive_prompts": len(both), "pack": pack,
        "mean_tokens": sum(r["tokens"] for r in rows) / len(rows),
        "batched_seconds": t_batched_all, "naive_seconds_measured": t_naive,
        "naive_seconds_estimated_all": t_naive_all,
        "time_ratio": ratio, "wall_time_ratio": wall_ratio, "work_bound": bound, "efficiency": ratio / bound,
        "batched_prompts_per_s": len(rows) / t_batched_all, "naive_prompts_per_s": len(both) / t_naive,
        "batched_restorations_per_s": cells(rows) / t_batched_all, "naive_restorations_per_s": cells(both) / t_naive,
        "batched_gflops_per_s": useful / 1e9, "naive_gflops_per_s": naive_rate / 1e9,
        "batched_executed_gflops_per_s": None if executed is None else executed / 1e9,
        "padding": stats.padding, "block_calls": stats.block_calls, "attention_shapes": len(stats.attention),
        "batched_fraction_of_peak": fraction(useful, peaks.get("datasheet")),
        "naive_fraction_of_peak": fraction(naive_rate, peaks.get("datasheet")),
        "batched_fraction_of_measured_peak": fraction(useful, peaks.get("measured")),
        "naive_fraction_of_measured_peak": fraction(naive_rate, peaks.get("measured")),
        "max_abs_diff": max(r["max_abs_diff"] for r in both),
        "batched_peak_mib": batched_peak,
        "naive_peak_mib": max((r["naive"]["peak_mib"] or 0) for r in both),
    }


def bench_model(spec, dtype, args, log) -> dict:
    model = tracekit.load_model(spec, backend="hf", dtype=dtype)
    kw = dict(kind=args.kind, window=min(args.window, model.n_layers), samples=args.samples, seed=0)
    clock = args.clock or ("wall" if model.device.type == "cuda" else "cpu")
    pack = args.pack or (len(PROMPTS) if model.device.type == "cuda" else 1)
    peaks = {"datasheet": datasheet_peak(dtype), "measured": measured_peak(dtype, clock=clock)}
    log(f"{spec} ({dtype}) on {model.device} ({model.forward_path}): {model.n_layers} layers, settings {kw}, "
        f"pack {pack}; matrix-product peak {peaks['measured'] / 1e12:.3f} TFLOP/s measured"
        + (f", {peaks['datasheet'] / 1e12:.0f} datasheet" if peaks["datasheet"] else ""))
    single = run_case(model, "one prompt", PROMPTS[:1], 1, kw, clock, log, 1, args.shapes, peaks)
    batch = run_case(model, f"{args.batch} prompts", PROMPTS[:args.batch], args.naive_prompts, kw, clock, log,
                     min(pack, args.batch), args.shapes, peaks)
    per_prompt = batch["batched_seconds"] / batch["prompts"]
    return {"model": spec, "dtype": dtype, "device": str(model.device), "settings": kw,
            "engine": "fast", "forward": model.forward_path, "shapes": args.shapes or "device default",
            "peak_flops": peaks, "cases": [single, batch], "study_estimate_minutes": STUDY_PROMPTS * per_prompt / 60}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _rate(gflops) -> str:
    return "-" if gflops is None else (f"{gflops / 1000:.1f}T" if gflops >= 1000 else f"{gflops:.1f}G")


def markdown(report: dict) -> str:
    lines = [f"# Tracing benchmark ({report['device']})", "",
             f"torch {report['torch']}, {report['when']}. Work bound = naive FLOPs / minimal FLOPs; "
             "efficiency = time ratio / work bound. Seconds are process CPU time on a CPU (a shared machine's "
             "wall clock mostly measures the neighbours; with one thread CPU time is the work done) and wall "
             "time on a GPU; the wall-clock ratio is given beside it. FLOP/s: each tracer's own work model "
             "(the batched tracer's minimal work; the naive loop's full passes) over its time, and for the "
             "batched tracer the blocks it executed (padding and masked attention included); % of peak: of the "
             "datasheet peak (known GPUs) / of a measured matrix product in the model's dtype.", "",
             "| model | case | prompts (naive) | pack | tokens | batched s | naive s | ratio (wall) | bound | efficiency "
             "| FLOP/s b (executed) / n | % of peak b / n | % of matmul b / n | padding | max diff | peak MiB b / n |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        for c in m["cases"]:
            lines.append(
                f"| {m['model']} ({m['dtype']}) | {c['case']} | {c['prompts']} ({c['naive_prompts']}) | {c['pack']} "
                f"| {c['mean_tokens']:.1f} | {c['batched_seconds']:.1f} | {c['naive_seconds_measured']:.1f} "
                f"| {c['time_ratio']:.2f}x ({c['wall_time_ratio']:.2f}x) | {c['work_bound']:.2f}x | {100 * c['efficiency']:.0f}% "
                f"| {_rate(c['batched_gflops_per_s'])} ({_rate(c['batched_executed_gflops_per_s'])}) / "
                f"{_rate(c['naive_gflops_per_s'])} "
                f"| {_pct(c['batched_fraction_of_peak'])} / {_pct(c['naive_fraction_of_peak'])} "
                f"| {_pct(c['batched_fraction_of_measured_peak'])} / {_pct(c['naive_fraction_of_measured_peak'])} "
                f"| {100 * c['padding']:.0f}% | {c['max_abs_diff']:.1e} "
                f"| {c['batched_peak_mib']:.0f} / {c['naive_peak_mib']:.0f} |")
    peaks = "; ".join(f"{m['model']}: matrix product {m['peak_flops']['measured'] / 1e9:,.0f} GFLOP/s measured"
                      + (f", datasheet {m['peak_flops']['datasheet'] / 1e12:.0f} TFLOP/s" if m['peak_flops']['datasheet']
                         else "") for m in report["models"])
    lines += ["", f"Peaks ({report['device']}): {peaks}.", "",
              "Batched time extrapolated to the paper's study size (652 prompts, all tokens x layers, "
              "same settings, this model and device): "
              + ", ".join(f"{m['model']} {m['study_estimate_minutes']:.1f} min" for m in report["models"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--smoke", action="store_true", help="random:gpt2-tiny, 3 prompts, 2 samples: seconds")
    parser.add_argument("--kind", default="mlp")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--batch", type=int, default=20, help="prompts in the batch case (at most 20)")
    parser.add_argument("--naive-prompts", type=int, default=None,
                        help="run the naive loop on only this many of the batch prompts (default: all)")
    parser.add_argument("--pack", type=int, default=None,
                        help="trace_many this many prompts at a time in the batch case (default: all on CUDA, 1 on a CPU)")
    parser.add_argument("--shapes", choices=["exact", "bucketed"], default=None,
                        help="passes of exact or bucketed shapes (default: bucketed on CUDA, exact on a CPU)")
    parser.add_argument("--no-gpu-extra", action="store_true", help="on CUDA, skip the GPT-J-6B shape")
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None,
                        help="time by wall clock or process CPU time (default: cpu on a CPU, wall on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="JSON path (a .md table is written beside it)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.samples, args.batch, args.window = "random:gpt2-tiny", 2, 3, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = max(1, min(args.batch, len(PROMPTS)))
    args.naive_prompts = args.batch if args.naive_prompts is None else max(1, min(args.naive_prompts, args.batch))
    log = lambda text: print(text, flush=True)  # noqa: E731
    models = [(args.model, args.dtype)]
    if torch.cuda.is_available() and not args.smoke and not args.no_gpu_extra:
        models.append(("random:gpt-j-6b", "bfloat16"))
    report = {"device": device_name(), "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M"),
              "command": "python benchmarks/bench_tracing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "models": [bench_model(spec, dtype, args, log) for spec, dtype in models]}
    tag = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or f"benchmarks/results/tracing-{args.model.replace(':', '-')}-{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
