"""Choose a model's default ROME layer as ROME did for GPT-J: average the MLP tracing
effect at the last subject token over facts the model knows, take the largest.

    python benchmarks/rome_layer.py --model smollm2-135m [--window 10 --samples 10]

Facts: the hand-written list below (known_1000-style prompts); a fact is kept when the
model's top-1 next token is the first token of its object. Writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tracekit

FACTS = [  # (prompt with {}, subject, object)
    ("{} is located in the city of", "The Eiffel Tower", " Paris"),
    ("{} is located in the city of", "The Colosseum", " Rome"),
    ("{} is located in the city of", "Big Ben", " London"),
    ("{} is located in the city of", "The Brandenburg Gate", " Berlin"),
    ("{} is located in the city of", "The Statue of Liberty", " New"),
    ("{} is located in the city of", "The Kremlin", " Moscow"),
    ("{} is located in the city of", "The Forbidden City", " Beijing"),
    ("{} is located in the city of", "The Sydney Opera House", " Sydney"),
    ("The capital of {} is the city of", "France", " Paris"),
    ("The capital of {} is the city of", "Japan", " Tokyo"),
    ("The capital of {} is the city of", "Italy", " Rome"),
    ("The capital of {} is the city of", "Germany", " Berlin"),
    ("The capital of {} is the city of", "Russia", " Moscow"),
    ("The capital of {} is the city of", "Egypt", " Cairo"),
    ("The capital of {} is the city of", "Spain", " Madrid"),
    ("The official language of {} is", "Mexico", " Spanish"),
    ("The official language of {} is", "Brazil", " Portuguese"),
    ("The official language of {} is", "Germany", " German"),
    ("The official language of {} is", "Japan", " Japanese"),
    ("The official language of {} is", "Italy", " Italian"),
    ("The official language of {} is", "Saudi Arabia", " Arabic"),
    ("{} was founded by", "Microsoft", " Bill"),
    ("{} was founded by", "Apple", " Steve"),
    ("{} was founded by", "Facebook", " Mark"),
    ("{} was developed by", "Windows", " Microsoft"),
    ("{} was developed by", "the iPhone", " Apple"),
    ("{} is produced by", "The Prius", " Toyota"),
    ("{} plays the sport of", "Michael Jordan", " basketball"),
    ("{} plays the sport of", "Lionel Messi", " football"),
    ("{} plays the sport of", "Roger Federer", " tennis"),
    ("{} is a citizen of", "Vladimir Putin", " Russia"),
    ("The mother tongue of {} is", "Jean Marais", " French"),
    ("{} was born in the country of", "Albert Einstein", " Germany"),
    ("{} is a professional", "Tiger Woods", " golfer"),
    ("The headquarters of {} are in the city of", "Google", " Mountain"),
    ("{} is the currency of", "The yen", " Japan"),
    ("{}, a planet in the solar system, is the", "Mars", " fourth"),
    ("{} flows into the", "The Nile", " Mediterranean"),
    ("{} is located in the continent of", "Kenya", " Africa"),
    ("{} is located in the continent of", "Brazil", " South"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/rome_layer_smollm2-135m.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = tracekit.load_model(args.model)
    started = time.perf_counter()
    known = []
    for prompt, subject, obj in FACTS:
        text = prompt.format(subject)
        probs = model.next_token_probs([text])[0]
        if int(probs.argmax()) == model.target_ids(obj)[0]:
            known.append((text, subject, obj, float(probs.max())))
    effects, raw, per_fact = [], [], []
    for text, subject, obj, p_top in known:
        result = tracekit.trace(model, text, subject, obj, kind="mlp", window=args.window, samples=args.samples,
                                tokens="subject_last")
        effect = result.effect_by_layer("last_subject").float()
        last = result.positions.index(result.subject_span[1] - 1)
        effects.append(effect)
        raw.append(result.p_restore[last].float() - result.p_noise)
        per_fact.append({"prompt": text, "object": obj, "p_clean": result.p_clean, "p_noise": result.p_noise,
                         "best_layer": int(effect.argmax())})
        print(f"{text!r} -> {obj!r}: p_clean={result.p_clean:.3f} p_noise={result.p_noise:.3f} "
              f"best layer {int(effect.argmax())}", flush=True)
    mean = torch.stack(effects).mean(0)
    mean_raw = torch.stack(raw).mean(0)
    report = {"model": args.model, "window": args.window, "samples": args.samples, "facts_tried": len(FACTS),
              "facts_known": len(known), "mean_effect_by_layer": [round(float(x), 4) for x in mean],
              "best_layer": int(mean.argmax()),
              "mean_indirect_effect_by_layer": [round(float(x), 4) for x in mean_raw],
              "best_layer_indirect_effect": int(mean_raw.argmax()), "facts": per_fact, "seconds": time.perf_counter() - started}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "facts"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
