"""Make the golden fixture: run the reference code on tiny GPT-2 models and store its numbers.

    .venv/bin/python tests/golden/make_golden.py --rome /work/refs/rome --memit /work/refs/memit \\
        --paper /work/refs/belief-localization --ref-python /work/refs/venv/bin/python

The three checkouts must be at the commits pinned in ``common.PINNED`` (``git clone`` each
repository and ``git checkout`` the commit; nothing of theirs is copied here). ``--ref-python``
is an environment with torch, transformers 4.x (their hooks expect GPT-2 blocks to return
tuples: 4.57.6 was used), numpy, pandas, scipy, unidecode, pyyaml and safetensors.

What it does: (``--train``) trains the tiny GPT-2 in ``tiny_gpt2/`` (a few hundred deterministic
Adam steps on the offline tokenizer's corpus; a few seconds); saves tracekit's
``random:gpt2-tiny`` for the reference side; computes C for every layer of both models
(``common.key_second_moment``, seeded random tokens); runs ``reference_runner.py`` once per
repository; writes ``reference.json`` (cases, inputs, scalars) and ``reference.safetensors``
(vectors and matrices); then runs tracekit on every case and prints how far apart the two are.
``tests/test_golden.py`` repeats that comparison offline, from the fixture.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from golden.common import (FIXTURE_JSON, FIXTURE_TENSORS, PINNED, TRAINED_DIR, build_cases,  # noqa: E402
                           key_second_moment, write_json)


def train_tiny_gpt2(out: Path, steps: int = 300, seed: int = 0) -> None:
    """A 6-layer GPT-2 (d_model 32) trained on the offline tokenizer's corpus, deterministically."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tracekit.models.random_models import _CORPUS, offline_tokenizer

    tok = offline_tokenizer()
    sentences = [s.strip() + "." for line in _CORPUS.strip().splitlines() for s in line.split(".") if s.strip()]
    rows = [tok(s)["input_ids"] for s in sentences]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    config = GPT2Config(vocab_size=512, n_embd=32, n_layer=6, n_head=4, n_positions=64)
    config.pad_token_id = config.bos_token_id = config.eos_token_id = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0 or step == steps - 1:
                print(f"train step {step}: loss {float(loss):.3f}")
    model.eval()
    model.generation_config.pad_token_id = model.generation_config.bos_token_id = 0
    model.generation_config.eos_token_id = 0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def known_subjects() -> list[str]:
    """Every known_1000 subject (the file is found as tracekit finds it; it is required here)."""
    from tracekit.data.locate import find_data_file

    return [r["subject"] for r in json.loads(find_data_file("known_1000").read_text())]


def check_checkout(path: str, name: str) -> str:
    head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    if head != PINNED[name][1]:
        raise SystemExit(f"{path} is at {head}, not the pinned {PINNED[name][1]} of {PINNED[name][0]}")
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rome", required=True, help="checkout of kmeng01/rome at the pinned commit")
    parser.add_argument("--memit", required=True, help="checkout of kmeng01/memit at the pinned commit")
    parser.add_argument("--paper", required=True, help="checkout of google/belief-localization at the pinned commit")
    parser.add_argument("--ref-python", default=sys.executable, help="python of the reference environment")
    parser.add_argument("--train", action="store_true", help="(re)train tiny_gpt2/ first")
    args = parser.parse_args()
    heads = {name: check_checkout(getattr(args, name), name) for name in ("rome", "memit", "paper")}
    if args.train or not (TRAINED_DIR / "model.safetensors").exists():
        train_tiny_gpt2(TRAINED_DIR)

    import tracekit
    from safetensors.torch import load_file, save_file

    from tracekit.tracing.noise import FALLBACK_SUBJECTS, embedding_std

    work = Path(tempfile.mkdtemp(prefix="golden-"))
    random = tracekit.load_model("random:gpt2-tiny")
    random.hf.save_pretrained(work / "random", safe_serialization=True)
    random.tokenizer.save_pretrained(work / "random")
    trained = tracekit.load_model(str(TRAINED_DIR))
    models = {"random": random, "trained": trained}
    stats = {f"{name}/{layer}": key_second_moment(m.hf, layer) for name, m in models.items()
             for layer in range(m.n_layers)}
    save_file(stats, str(work / "stats.safetensors"))
    noise = {name: 3 * embedding_std(m, FALLBACK_SUBJECTS) for name, m in models.items()}
    cases = build_cases(noise)
    inputs = {"models": {"random": str(work / "random"), "trained": str(TRAINED_DIR)},
              "stats": str(work / "stats.safetensors"), "cases": cases,
              "subjects": {"fallback": list(FALLBACK_SUBJECTS), "known_1000": known_subjects()}}
    (work / "inputs.json").write_text(json.dumps(inputs))
    results, tensors = {}, {}
    checkouts = {"rome": args.rome, "memit": args.memit, "paper": str(Path(args.paper) / "third_party")}
    for repo, checkout in checkouts.items():
        out = work / f"out_{repo}.json"
        subprocess.run([args.ref_python, str(HERE / "reference_runner.py"), "--repo", repo, "--checkout", checkout,
                        "--inputs", str(work / "inputs.json"), "--out", str(out)], check=True)
        results.update(json.loads(out.read_text()))
        tensors.update(load_file(str(out.with_suffix(".safetensors"))))
    fixture = {
        "about": "Numbers of the reference code on tiny GPT-2 models; made by tests/golden/make_golden.py",
        "pinned": {name: {"url": PINNED[name][0], "commit": heads[name]} for name in heads},
        "reference_env": subprocess.run([args.ref_python, "-c", "import torch, transformers; "
                                         "print(torch.__version__, transformers.__version__)"],
                                        capture_output=True, text=True).stdout.strip(),
        "noise_scale": noise,
        "models": {name: {"fingerprint": _fingerprint(m.hf)} for name, m in models.items()},
        "stats": {k: {"trace": float(v.trace()), "sum": float(v.sum())} for k, v in stats.items()},
        "cases": cases,
        "results": results,
    }
    write_json(FIXTURE_JSON, fixture)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(FIXTURE_TENSORS))
    print(f"wrote {FIXTURE_JSON} and {FIXTURE_TENSORS} ({len(cases)} cases)")
    from golden.tracekit_side import compare_all

    for line in compare_all(fixture, load_file(str(FIXTURE_TENSORS))):
        print(line)


def _fingerprint(hf) -> dict:
    return {"n_params": sum(p.numel() for p in hf.parameters()),
            "sum": float(sum(p.double().sum() for p in hf.parameters())),
            "abs_sum": float(sum(p.double().abs().sum() for p in hf.parameters()))}


if __name__ == "__main__":
    main()
