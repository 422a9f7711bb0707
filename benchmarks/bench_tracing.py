"""Tracing benchmark: the batched tracer vs the naive one-pass-per-(token, layer) loop.

    python benchmarks/bench_tracing.py                      # bundled SmolLM2-135M (long on a CPU)
    python benchmarks/bench_tracing.py --smoke              # tiny random model, seconds (CI)
    python benchmarks/bench_tracing.py --naive-prompts 3    # naive loop on 3 of the 20 batch prompts

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
import os
import platform
import sys
import time
from pathlib import Path

import torch

import tracekit
from tracekit.tracing import naive_trace, trace, window_layers
from tracekit.tracing.engine import fast_unsupported_reason

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


def run_case(model, name, prompts, naive_count, kw, clock, log) -> dict:
    device = model.device
    fm = flop_model(model)
    rows = []
    for i, (prompt, subject) in enumerate(prompts):
        batched = lambda: trace(model, prompt, subject, **kw)  # noqa: E731
        naive = lambda: naive_trace(model, prompt, subject, **kw)  # noqa: E731
        order = [("batched", batched), ("naive", naive)] if i % 2 == 0 else [("naive", naive), ("batched", batched)]
        row = {"prompt": prompt}
        for label, fn in order:
            if label == "naive" and i >= naive_count:
                continue
            wall, cpu, peak, result = timed(fn, device)
            row[label] = {"seconds": cpu if clock == "cpu" else wall, "wall": wall, "cpu": cpu, "peak_mib": peak,
                          "p_restore": result.p_restore}
        T = len(model.tokens(prompt))
        row["tokens"], row["restorations"] = T, T * model.n_layers
        row["naive_flops"], row["minimal_flops"] = work(fm, T, kw["window"], kw["samples"])
        if "naive" in row:
            row["max_abs_diff"] = float((row["batched"]["p_restore"] - row["naive"]["p_restore"]).abs().max())
        log(f"  {name} {i + 1}/{len(prompts)}: {T} tokens, batched {row['batched']['seconds']:.2f}s"
            + (f", naive {row['naive']['seconds']:.2f}s, diff {row['max_abs_diff']:.1e}" if "naive" in row else ""))
        rows.append(row)
    both = [r for r in rows if "naive" in r]
    t_batched_all = sum(r["batched"]["seconds"] for r in rows)
    t_batched = sum(r["batched"]["seconds"] for r in both)
    t_naive = sum(r["naive"]["seconds"] for r in both)
    bound = sum(r["naive_flops"] for r in both) / sum(r["minimal_flops"] for r in both)
    ratio = t_naive / t_batched
    wall_ratio = sum(r["naive"]["wall"] for r in both) / sum(r["batched"]["wall"] for r in both)
    cells = lambda rs: sum(r["restorations"] for r in rs)  # noqa: E731
    return {
        "case": name, "clock": clock, "prompts": len(rows), "naive_prompts": len(both),
        "mean_tokens": sum(r["tokens"] for r in rows) / len(rows),
        "batched_seconds": t_batched_all, "naive_seconds_measured": t_naive,
        "naive_seconds_estimated_all": t_naive / t_batched * t_batched_all if both else None,
        "time_ratio": ratio, "wall_time_ratio": wall_ratio, "work_bound": bound, "efficiency": ratio / bound,
        "batched_prompts_per_s": len(rows) / t_batched_all, "naive_prompts_per_s": len(both) / t_naive,
        "batched_restorations_per_s": cells(rows) / t_batched_all, "naive_restorations_per_s": cells(both) / t_naive,
        "batched_gflops_per_s": sum(r["minimal_flops"] for r in both) / t_batched / 1e9,
        "naive_gflops_per_s": sum(r["naive_flops"] for r in both) / t_naive / 1e9,
        "max_abs_diff": max(r["max_abs_diff"] for r in both),
        "batched_peak_mib": max((r["batched"]["peak_mib"] or 0) for r in rows),
        "naive_peak_mib": max((r["naive"]["peak_mib"] or 0) for r in both),
    }


def bench_model(spec, dtype, args, log) -> dict:
    model = tracekit.load_model(spec, backend="hf", dtype=dtype)
    kw = dict(kind=args.kind, window=min(args.window, model.n_layers), samples=args.samples, seed=0)
    log(f"{spec} ({dtype}) on {model.device}: {model.n_layers} layers, settings {kw}")
    clock = args.clock or ("wall" if model.device.type == "cuda" else "cpu")
    single = run_case(model, "one prompt", PROMPTS[:1], 1, kw, clock, log)
    batch = run_case(model, f"{args.batch} prompts", PROMPTS[:args.batch], args.naive_prompts, kw, clock, log)
    per_prompt = batch["batched_seconds"] / batch["prompts"]
    return {"model": spec, "dtype": dtype, "device": str(model.device), "settings": kw,
            "engine": "generic" if fast_unsupported_reason(model) else "fast",
            "cases": [single, batch], "study_estimate_minutes": STUDY_PROMPTS * per_prompt / 60}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def markdown(report: dict) -> str:
    lines = [f"# Tracing benchmark ({report['device']})", "",
             f"torch {report['torch']}, {report['when']}. Work bound = naive FLOPs / minimal FLOPs; "
             "efficiency = time ratio / work bound. Seconds are process CPU time on a CPU (a shared machine's "
             "wall clock mostly measures the neighbours; with one thread CPU time is the work done) and wall "
             "time on a GPU; the wall-clock ratio is given beside it.", "",
             "| model | case | prompts (naive) | tokens | batched s | naive s | ratio (wall) | bound | efficiency "
             "| prompts/s b / n | restorations/s b / n | max diff | peak MiB b / n |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        for c in m["cases"]:
            lines.append(
                f"| {m['model']} ({m['dtype']}) | {c['case']} | {c['prompts']} ({c['naive_prompts']}) "
                f"| {c['mean_tokens']:.1f} | {c['batched_seconds']:.1f} | {c['naive_seconds_measured']:.1f} "
                f"| {c['time_ratio']:.2f}x ({c['wall_time_ratio']:.2f}x) | {c['work_bound']:.2f}x | {100 * c['efficiency']:.0f}% "
                f"| {c['batched_prompts_per_s']:.3f} / {c['naive_prompts_per_s']:.3f} "
                f"| {c['batched_restorations_per_s']:.1f} / {c['naive_restorations_per_s']:.1f} "
                f"| {c['max_abs_diff']:.1e} | {c['batched_peak_mib']:.0f} / {c['naive_peak_mib']:.0f} |")
    lines += ["", "Batched time extrapolated to the paper's study size (652 prompts, all tokens x layers, "
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
