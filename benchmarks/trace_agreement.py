"""Does the batched tracer agree with the naive loop on one prompt, packed with others or alone,
in a given dtype? The 2026-11-26 H200 run found 3.5e-4 (a quarter of p) on a 29-token prompt in
bfloat16 where the CPU gives 1e-5; this separates packing, the dtype and the kernels.

    python benchmarks/trace_agreement.py --dtype bfloat16 --packed --out agreement-bf16.json
    python benchmarks/trace_agreement.py --model random:gptj-tiny --length 9     # seconds on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tracekit  # noqa: E402
from gpu_quick import clocked, distinct_length_prompts  # noqa: E402
from tracekit.tracing import naive_trace, trace_many  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt-j-6b" if torch.cuda.is_available() else "random:gptj-tiny")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--length", type=int, default=29, help="the prompt's token length (the nearest there is)")
    parser.add_argument("--prompts", type=int, default=20, help="prompts of distinct lengths it is packed with")
    parser.add_argument("--packed", action="store_true", help="also trace it packed with the other prompts")
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    model = tracekit.load_model(args.model, dtype=args.dtype)
    prompts = distinct_length_prompts(model, args.prompts)
    lengths = [len(model.tokens(p)) for p, _ in prompts]
    i = min(range(len(prompts)), key=lambda j: abs(lengths[j] - args.length))
    kw = dict(kind="mlp", window=min(10, model.n_layers), samples=10, seed=0)
    report = {"model": args.model, "dtype": args.dtype, "device": str(model.device), "tokens": lengths[i], **kw,
              "tf32": torch.backends.cuda.matmul.allow_tf32 if torch.cuda.is_available() else None}
    runs = {}
    seconds, runs["naive"] = clocked(lambda: naive_trace(model, *prompts[i], **kw).p_restore)
    report["naive_seconds"] = seconds
    seconds, alone = clocked(lambda: [r for _, r in trace_many(model, [prompts[i]], progress=False, **kw)])
    runs["alone"], report["alone_seconds"] = alone[0].p_restore, seconds
    if args.packed:
        seconds, packed = clocked(lambda: [r for _, r in trace_many(model, prompts, batch=len(prompts), progress=False, **kw)])
        runs["packed"], report["packed_seconds"] = packed[i].p_restore, seconds
    report["p_clean"], report["p_noise"] = alone[0].p_clean, alone[0].p_noise
    report["max_abs_diff"] = {f"{a} vs {b}": float((runs[a].float() - runs[b].float()).abs().max())
                              for a in runs for b in runs if a < b}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    raise SystemExit(code)
