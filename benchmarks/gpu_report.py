"""The GPU quick check's Markdown report (``gpu_quick.py`` writes it beside report.json)."""

from __future__ import annotations

STUDY_POINTS, STUDY_LAYERS = 652, 9  # the paper's editing sweep: points x layers


def _f(value, fmt="{:.2f}", none="-") -> str:
    return none if value is None else fmt.format(value)


def _tflops(value) -> str:
    """A rate given in TFLOP/s, written with its unit (small rates, a CPU's, in GFLOP/s)."""
    return "-" if value is None else (f"{value:.1f} T" if value >= 1 else f"{1000 * value:.2f} G")


def markdown(report: dict) -> str:
    stages = report["stages"]
    lines = [f"# GPU quick check: {report.get('model', '?')} ({report.get('dtype', '?')}) on {report['device']}", "",
             f"Started {report['started']}; {report.get('elapsed_s', 0):.0f} s of a {report['time_limit_s']:.0f} s limit."]
    dev = stages.get("device", {})
    if "torch" in dev:
        lines += ["", f"torch {dev['torch']}, transformers {dev['transformers']}; optional packages present: "
                  + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in dev["optional_packages_present"].items())
                  + f". Matrix-product peak ({dev['dtype']}): measured {_tflops(dev['measured_matmul_flops'] / 1e12)}FLOP/s"
                  + (f", datasheet {dev['datasheet_peak_flops'] / 1e12:.0f}" if dev.get("datasheet_peak_flops") else "")
                  + "."]
    if "load" in stages and "seconds" in stages["load"]:
        lines.append(f"Model load: {stages['load']['seconds']:.1f} s.")
    tr = stages.get("tracing", {})
    if "cold" in tr:
        lines += ["", f"## Tracing ({len(tr['prompt_lengths'])} prompts of distinct lengths "
                  f"{min(tr['prompt_lengths'])}..{max(tr['prompt_lengths'])} tokens, {tr['settings']}, packed)", "",
                  "| run | seconds | s / prompt | ratio vs naive | work bound | efficiency | useful FLOP/s "
                  "| executed FLOP/s | % of peak | % of measured matmul | padding | attention shapes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label in ("cold", "warm"):
            e = tr.get(label, {})
            if "seconds" not in e:
                continue
            lines.append(f"| {label} | {e['seconds']:.1f} | {e['seconds_per_prompt']:.2f} | {_f(e.get('ratio'), '{:.2f}x')} "
                         f"| {_f(tr.get('work_bound'), '{:.2f}x')} | {_f(e.get('efficiency'), '{:.0%}')} "
                         f"| {_tflops(e['useful_tflops'])} | {_tflops(e['executed_tflops'])} "
                         f"| {_f(e.get('fraction_of_peak'), '{:.0%}')} "
                         f"| {_f(e.get('fraction_of_measured_peak'), '{:.0%}')} | {e['padding']:.0%} | {e['attention_shapes']} |")
        if tr.get("naive"):
            lines += ["", "Naive loop: " + "; ".join(f"{d['tokens']} tokens {d['seconds']:.1f} s (max diff "
                                                     f"{d['max_abs_diff']:.1e})" for d in tr["naive"])
                      + f"; {_tflops(tr.get('naive_tflops'))}FLOP/s "
                      f"({_f(tr.get('naive_fraction_of_peak'), '{:.0%}')} of peak)."]
        lines.append(f"Study estimate (652 prompts like these): {tr['study_estimate_minutes']:.1f} min.")
    ed = stages.get("editing", {})
    if "methods" in ed:
        lines += ["", f"## Editing (layer {ed['layer']}, key statistics from {ed['mom2_samples']} x {ed['mom2_tokens']} "
                  f"tokens: {ed['key_statistics_seconds']:.1f} s)", "", "| method | s / edit | first call s | parts |",
                  "|---|---|---|---|"]
        for method, e in ed["methods"].items():
            if "seconds" in e:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in (e.get("parts") or {}).items() if isinstance(v, float))
                lines.append(f"| {method} | {e['seconds']:.2f} | {e['first_call_seconds']:.1f} | {parts} |")
            else:
                lines.append(f"| {method} | {e.get('skipped', '-')} | | |")
        lines.append("")
        lines.append(f"Key-statistics factorisations made (layer: count, over every edit above): {ed.get('factorisations')}.")
        if "rome_batched" in ed:
            rb = ed["rome_batched"]
            lines.append(f"ROME, {rb['requests']} requests batched: {rb['seconds']:.2f} s ({rb['seconds_per_request']:.2f} s "
                         f"per request, v* {rb['v_star_seconds_per_request']:.2f} s).")
        if "memit_mass" in ed:
            lines.append(f"Mass MEMIT, {ed['memit_mass']['requests']} requests in one edit: {ed['memit_mass']['seconds']:.2f} s.")
    sw = stages.get("sweep", {})
    if sw.get("methods"):
        lines += ["", f"## Sweep ({sw['points']} points x layers {sw['layers']}, edit + score, as a study runs it)", "",
                  f"Key statistics for these layers first (once per layer in a study): {sw['key_statistics_seconds']:.1f} s.",
                  "", "| method | points | batch | s per (point, layer) | 652 x 9 sweep estimate | peak GPU memory |",
                  "|---|---|---|---|---|---|"]
        for label, e in sw["methods"].items():
            if "error" in e:
                lines.append(f"| {label} | {e['points']} | {e['batch']} | failed: {e['error'][:120]} | | "
                             f"{_f(e.get('peak_gpu_gib'), '{:.1f} GiB')} |")
                continue
            hours = _f(e.get("study_sweep_hours"), "{:.2f} h", "- (stopped early)")
            lines.append(f"| {label} | {e['points']} | {e['batch']} | {e['per_point_layer_seconds']:.2f} | {hours} "
                         f"| {_f(e.get('peak_gpu_gib'), '{:.1f} GiB')} |")
    broken = [f"{name}: {s['error']}" for name, s in stages.items() if "error" in s]
    skipped = [f"{name}: {s['skipped']}" for name, s in stages.items() if "skipped" in s]
    if broken or skipped:
        lines += ["", "## Not measured", ""] + [f"- {b}" for b in broken + skipped]
    return "\n".join(lines) + "\n"
