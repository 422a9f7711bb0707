"""``tracekit trace``: trace (or zero) one prompt, print the heatmap, write PNG + JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from tracekit.cli.common import add_model_args, add_prompt_args, console, fill, load_from_args, prompt_template

KINDS = ("mlp", "attn", "resid")  # == tracekit.tracing.plan.KINDS (tested)


def _tokens(text: str):
    if text in ("all", "subject", "subject_last"):
        return text
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("use all, subject, subject_last or comma-separated indices") from None


def _noise(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _trace(args) -> None:
    from tracekit.tracing import trace, zero_trace

    prompt, occurrence = fill(prompt_template(args.prompt, args.subject, args.occurrence), args.subject)
    model = load_from_args(args)
    with console.status(f"{'zeroing' if args.zero else 'tracing'} {args.kind} (window {args.window})"):
        if args.zero:
            result = zero_trace(model, prompt, args.subject, args.target, kind=args.kind, window=args.window,
                                tokens=args.tokens if args.tokens != "all" else "subject", occurrence=occurrence)
        else:
            result = trace(model, prompt, args.subject, args.target, kind=args.kind, window=args.window,
                           samples=args.samples, noise=_noise(args.noise), tokens=args.tokens, seed=args.seed,
                           occurrence=occurrence)
    console.print(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{'zero' if args.zero else 'trace'}-{args.kind}-w{args.window}"
        result.to_json(out / f"{stem}.json")
        result.save(out / f"{stem}.png")
        console.print(f"wrote {out / stem}.json and {out / stem}.png")


def register(sub) -> None:
    p = sub.add_parser(
        "trace", help="causal tracing (or representation zeroing) of one prompt",
        description="Noise the subject's embeddings, restore clean states token by token and layer by layer, "
                    "and show how much of p(answer) each restoration brings back.",
    )
    add_prompt_args(p, subject="the subject whose token embeddings are noised, as written in the prompt")
    p.add_argument("--target", default=None, help="answer to trace, with its leading space (default: the top prediction)")
    p.add_argument("--kind", default="mlp", choices=KINDS, help="state to restore; default: %(default)s")
    p.add_argument("--window", type=int, default=10, help="layers restored around each layer; default: %(default)s")
    p.add_argument("--samples", type=int, default=10, help="noise draws averaged; default: %(default)s")
    p.add_argument("--noise", default="s3", help="'s3' (3 x embedding std), a float, or 'u<scale>'; default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="noise seed; default: %(default)s")
    p.add_argument("--tokens", type=_tokens, default="all",
                   help="tokens to restore: all, subject, subject_last or indices '0,3,4'; default: %(default)s")
    p.add_argument("--zero", action="store_true", help="representation zeroing instead of noise-and-restore")
    p.add_argument("--out", default=None, help="folder for the PNG heatmap and the JSON result")
    add_model_args(p)
    p.set_defaults(func=_trace)
