"""How well attribution patching approximates exact activation patching.

    python benchmarks/attribution_agreement.py            # the tiny random models and SmolLM2-135M
    python benchmarks/attribution_agreement.py --smoke    # tiny models only (seconds)

For each model: one clean/corrupted prompt pair, metric = logit difference (the clean answer minus
the corrupted run's answer), denoising. Exact patching (``tracekit.patch``, every layer x position,
and per head for z) against ``tracekit.attribution_patch``: Pearson and Spearman correlation of
the per-patch effects (value - corrupted value) per site, and the wall time of each. Writes
``benchmarks/results/attribution-agreement.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tracekit

PAIRS = {  # (clean, corrupted): the same number of tokens for each model's tokenizer
    "random": ("The Eiffel Tower is located in the city of", "The Space Needle is located in the city of"),
    "smollm2-135m": ("The Eiffel Tower is located in the city of", "The Space Needle is located in the city of"),
}
SITES = ("resid_pre", "attn_out", "mlp_out", "z")


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-30))


def measure(spec: str) -> list[dict]:
    model = tracekit.load_model(spec, device="cpu")
    clean, corrupt = PAIRS["smollm2-135m" if spec == "smollm2-135m" else "random"]
    rows = []
    for site in SITES:
        heads = "each" if site == "z" else None
        start = time.perf_counter()
        exact = tracekit.patch(model, clean, corrupt, sites=site, heads=heads, metric="logit_diff")
        exact_s = time.perf_counter() - start
        start = time.perf_counter()
        approx = tracekit.attribution_patch(model, clean, corrupt, sites=site, metric="logit_diff")
        approx_s = time.perf_counter() - start
        assert [(p.layer, p.positions, p.head) for p in exact.patches] == \
            [(p.layer, p.positions, p.head) for p in approx.patches]
        e, a = exact.values - exact.m_corrupt, approx.values - approx.m_corrupt
        rows.append({"model": spec, "site": site, "patches": len(e), "pearson": pearson(e, a),
                     "spearman": pearson(ranks(e), ranks(a)), "exact_s": exact_s, "attribution_s": approx_s,
                     "gap": exact.m_clean - exact.m_corrupt})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random models only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    specs = ["random:gpt2-tiny", "random:gptj-tiny", "random:llama-tiny"] + ([] if args.smoke else ["smollm2-135m"])
    rows = [row for spec in specs for row in measure(spec)]
    out = Path(__file__).parent / "results" / "attribution-agreement"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["# Attribution patching vs exact activation patching", "",
             "Denoising, metric = logit difference (clean answer - corrupted answer), one prompt pair per model, "
             "effects = value - corrupted value per (layer, position[, head]); CPU, one thread.", "",
             "| model | site | patches | Pearson | Spearman | exact s | attribution s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['site']} | {r['patches']} | {r['pearson']:.3f} | {r['spearman']:.3f} | "
              f"{r['exact_s']:.2f} | {r['attribution_s']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
