#!/usr/bin/env python
"""The numbers behind docs/fidelity.md: how close tracekit is to the reference code, and what each
convention where the two can differ changes.

Five parts, each writing its section of ``fidelity_effects.json`` (beside this file; the other
sections are kept):

golden    on the golden fixture's two tiny GPT-2 models (tests/golden, offline, ~2 min): tracekit's
          distance from the reference numbers for every case, and for every case the distance and
          p(target) when ONE convention is switched (ROME, MEMIT, FT, the problems).
s3        the embedding std behind s3 under ROME's rule (known_1000) and the fallbacks, on both tiny
          models and SmolLM2-135M, and p_noise(o_true) on a few facts at each scale.
smollm2   Error Injection edits on the bundled SmolLM2-135M (a few CounterFact points it knows), with
          ROME, MEMIT and FT-1 under the reference conventions (tracekit's defaults) and with
          conventions switched: mean rewrite / paraphrase / neighbourhood scores (the paper's text
          scoring and, for the reference edits, the paper's code scoring), the weight update's
          change relative to the reference one, and for ROME gamma = (C^-1 k*)^T k_p / (C^-1 k*)^T k*,
          what the paper's equation delivers to the edited prompt as a fraction of the public code's.
essence   the essence score of ROME's reference edits on the same points, as the paper's code
          computes it and as tracekit 0.1 did.
bare      ROME on "Paris is a city in the country of" with and without SmolLM2's document-start
          token, with both forms of the update (the README's attention-sink sentence).

    python docs/fidelity_effects.py golden
    TRACEKIT_DATA=../shared/data python docs/fidelity_effects.py s3
    TRACEKIT_DATA=../shared/data python docs/fidelity_effects.py smollm2 --methods rome
    TRACEKIT_DATA=../shared/data python docs/fidelity_effects.py essence
    python docs/fidelity_effects.py bare
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the golden fixture's helpers (tests/golden)

import tracekit  # noqa: E402
from tracekit.editing.finetune import LEGACY_FT, apply_ft  # noqa: E402
from tracekit.editing.hparams import LEGACY  # noqa: E402
from tracekit.editing.memit import apply_memit  # noqa: E402
from tracekit.editing.metrics import MetricsConfig, evaluate_edit  # noqa: E402
from tracekit.editing.presets import ft_preset, memit_preset, rome_preset  # noqa: E402
from tracekit.editing.problems import prepare  # noqa: E402
from tracekit.editing.rome import apply_rome, key_statistics, rank_one  # noqa: E402

OUT = HERE / "fidelity_effects.json"
SCORES = ("rewrite", "paraphrase", "neighborhood")
# the first six CounterFact points (case-id order) that SmolLM2-135M knows: the paper's filter,
# verdicts in docs/replication/counterfact/store.sqlite; 3 relations, 3 prompts open with the subject
COUNTERFACT_CASES = (0, 196, 225, 253, 371, 576)


def log(text: str) -> None:
    print(text, flush=True)


# ---- golden: the tiny GPT-2s of tests/golden ----------------------------------------------------------------
ROME_SWITCHES = {
    "value_reference=mean": {"value_reference": "mean"},
    "update_key=mean (paper's equation)": {"update_key": "mean"},
    "v_stop_on=nll, v_final_step=True (tracekit 0.1 loop)": {"v_stop_on": "nll", "v_final_step": True},
    "v_final_step=True (20 steps)": {"v_final_step": True},
    "v_stop_on=None (the paper's code)": {"v_stop_on": None},
    "mom2_solve=inverse (public arithmetic)": {"mom2_solve": "inverse"},
    "tracekit 0.1 (LEGACY['rome'])": LEGACY["rome"],
}
MEMIT_SWITCHES = {
    "key_average=uniform": {"key_average": "uniform"},
    "z_current=mean": {"z_current": "mean"},
    "value_reference=mean": {"value_reference": "mean"},
    "v_stop_on=nll, v_final_step=True": {"v_stop_on": "nll", "v_final_step": True},
    "tracekit 0.1 (LEGACY['memit'])": LEGACY["memit"],
}
FT_SWITCHES = {
    "train_bias=False": {"train_bias": False},
    "loss_reduction=mean": {"loss_reduction": "mean"},
    "tracekit 0.1 (LEGACY_FT)": LEGACY_FT,
}


def _golden_gamma(T, case) -> float:
    m = T.model(case["model"])
    edit = apply_rome(m, T.request(case), case["layer"], T.rome_hp(case), templates=case["templates"],
                      second_moment=T.second_moment(case["model"], case["layer"]).float(), progress=False)
    return _gamma(T.second_moment(case["model"], case["layer"]), edit, ridge=0.0)


def _gamma(C, edit, ridge: float) -> float:
    """(C^-1 k*)^T k_p / (C^-1 k*)^T k* of a ROME edit made with update_key="prompt"."""
    C = getattr(C, "matrix", C).double()  # a LayerStats (rome.key_statistics) or the matrix
    if ridge:
        C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    k_star = edit.info.details["key"].double()
    (k_p,) = edit.info.details["keys"].double()
    u = torch.linalg.solve(C, k_star)
    return float(u @ k_p / (u @ k_star))


def golden_section() -> dict:
    from safetensors.torch import load_file

    from golden import tracekit_side as T
    from golden.common import FACTS, FIXTURE_JSON, FIXTURE_TENSORS

    torch.set_num_threads(1)  # tiny models: one thread is much faster on a shared CPU
    fixture = json.loads(FIXTURE_JSON.read_text())
    results, tensors = fixture["results"], load_file(str(FIXTURE_TENSORS))
    out: dict = {"fixture": {"pinned": fixture["pinned"], "reference_env": fixture["reference_env"],
                             "noise_scale": fixture["noise_scale"]}, "cases": {}}

    def distance(got, case) -> float:
        return T.delta_distance(got, T.reference_deltas(case, results, tensors))

    for case in fixture["cases"]:
        cid, kind = case["id"], case["kind"]
        ref = results[cid]
        started = time.perf_counter()
        row: dict = {"kind": kind}
        if kind in ("rome", "memit"):
            run = T.run_rome if kind == "rome" else T.run_memit
            got = run(case)
            row.update(distance=distance(got.deltas, case), p_after=got.p_after, p_after_reference=ref["after"]["p_first"])
            m, req = T.model(case["model"]), T.request(case)
            row["p_before"] = float(m.target_probs([req.text], req.target)[0])
            row["switched"] = {}
            for name, changes in (ROME_SWITCHES if kind == "rome" else MEMIT_SWITCHES).items():
                other = run(case, **changes)
                row["switched"][name] = {"distance": distance(other.deltas, case), "p_after": other.p_after}
            if kind == "rome":
                row["gamma"] = _golden_gamma(T, case)
        elif kind == "trace":
            got = T.run_trace(case)
            row.update(max_abs=float((got.p_restore - tensors[f"{cid}/scores"]).abs().max()),
                       p_noise_abs=abs(got.p_noise - ref["low_score"]))
        elif kind == "s3":
            got = T.run_s3(case)
            row.update(std=got, std_reference=ref["std"],
                       relative=None if got is None else abs(got - ref["std"]) / ref["std"],
                       tracekit_0_1_rule=T.run_s3(case, rule="tracekit-0.1"))
        else:
            row.update(_golden_paper_case(T, FACTS, case, ref, results, tensors))
        row["seconds"] = round(time.perf_counter() - started, 2)
        out["cases"][cid] = row
        log(f"golden {cid}: " + json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}, default=str))
    return out


def _golden_paper_case(T, FACTS, case, ref, results, tensors) -> dict:
    """A google/belief-localization case: the reference's scores and tracekit's, and the same with
    the problem's conventions switched one at a time."""
    keys = ("rewrite_score", "paraphrase_score", "neighborhood_score", "pre_essence_ppl", "post_essence_ppl")
    setup, edit, scores = T.run_paper(case)
    mine = T.paper_scores(scores)
    row = {"scores_reference": {k: ref["scores"][k] for k in keys}, "scores": {k: mine[k] for k in keys}}
    if case["problem"] == "tracing-reversal":
        f = FACTS[case["fact"]]
        row["o_noise_equal"] = ref["request"]["target_new"]["str"] == f["prompt"].format(f["subject"]) + setup.request.target
        return row
    reference = T.reference_deltas(case, results, tensors)
    row["distance"] = T.delta_distance({k: edit.delta(k) for k in edit.parameter_names}, reference)
    row["max_score_relative"] = max(abs(mine[k] - ref["scores"][k]) / max(abs(ref["scores"][k]), 1e-6) for k in keys)
    switches: dict[str, dict] = {}
    if case["alg"] == "FT":
        switches = {name: {"hp_changes": dict(c)} for name, c in FT_SWITCHES.items()}
    if case["problem"] == "fact-erasure":
        switches["erasure_objective=log-probability"] = {"hp_changes": {"erasure_objective": "log-probability"}}
    if case["problem"] == "fact-forcing":
        switches["convention=tracekit (noise, o_noise)"] = {"convention": "tracekit"}
    row["switched"] = {}
    for name, change in switches.items():
        _, other, other_scores = T.run_paper(case, **change)
        changed = {k: other.delta(k) for k in other.parameter_names}
        shared = sorted(set(changed) & set(reference))  # train_bias=False leaves the biases out
        row["switched"][name] = {
            "distance": T.delta_distance({k: changed[k] for k in shared}, {k: reference[k] for k in shared}),
            "parameters": "same" if sorted(changed) == sorted(reference) else sorted(changed),
            "scores": {k: T.paper_scores(other_scores)[k] for k in keys}}
    text = T.run_paper(case, scoring="paper-text")[2].scores
    row["scores_paper_text"] = {k: float(text[k]) for k in SCORES}
    return row


# ---- s3 ------------------------------------------------------------------------------------------------------
def s3_section(facts: int) -> dict:
    from golden.common import TRAINED_DIR
    from tracekit.data import load_dataset
    from tracekit.tracing.noise import FALLBACK_SUBJECTS, noise_scale_info, noise_subjects

    _, source = noise_subjects()
    if not source.startswith("known_1000"):
        raise SystemExit("s3 needs known_1000.json: set TRACEKIT_DATA to the folder holding it")
    records = [r for r in load_dataset("counterfact") if r.case_id in COUNTERFACT_CASES][:facts]
    out: dict = {"known_1000": source, "models": {}}
    for spec in ("random:gpt2-tiny", str(TRAINED_DIR), "smollm2-135m"):
        model = tracekit.load_model(spec)
        known = noise_scale_info(model, "s3").embedding_std
        fallback = noise_scale_info(model, "s3", FALLBACK_SUBJECTS).embedding_std
        ids = sorted({i for s in FALLBACK_SUBJECTS for i in model.target_ids(" " + s.strip())})
        with torch.no_grad():
            old = float(model.hf.get_input_embeddings()(torch.tensor(ids, device=model.device)).double().std())
        row = {"rome_rule_known_1000": known, "rome_rule_fallback_16": fallback, "tracekit_0_1_rule": old,
               "fallback_over_known": fallback / known, "tracekit_0_1_over_known": old / known}
        if spec == "smollm2-135m":  # what the scale does to the corrupted run
            row["p_noise"] = {name: [_p_noise(model, r, 3 * std) for r in records]
                              for name, std in (("known_1000", known), ("fallback_16", fallback), ("tracekit_0_1", old))}
            row["p_clean"] = [float(model.target_probs([r.text], r.target_true)[0]) for r in records]
            row["facts"] = [r.case_id for r in records]
        out["models"]["tiny_gpt2 (trained, tests/golden)" if spec == str(TRAINED_DIR) else spec] = row
        log(f"s3 {spec}: " + json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}))
    return out


def _p_noise(model, record, scale: float, samples: int = 10, seed: int = 0) -> float:
    """p(first token of o_true) with the subject noised at ``scale`` (mean over ``samples`` draws)."""
    from tracekit.adapters import Site
    from tracekit.tracing.noise import scaled_noise, subject_noise_hook

    start, end = model.subject_span(record.text, record.subject)
    draws = scaled_noise(model, samples, end - start, float(scale), seed)
    batch = model.encode([record.text])
    logits = model.run(batch.input_ids.expand(samples, -1), edits={Site("embed"): subject_noise_hook(draws, start)},
                       positions=batch.last.expand(samples)).logits
    target = model.target_ids(record.target_true)[0]
    return float(torch.softmax(logits.float(), dim=-1)[:, target].mean())


# ---- smollm2: edits on the bundled model ---------------------------------------------------------------------
PAPER_FORM = "update_key=mean, same v* (the paper's equation on the reference's v*)"
SMOLLM2_VARIANTS = {
    "rome": {"reference (public code)": {}, PAPER_FORM: None, **ROME_SWITCHES},
    "memit": {"reference (public code)": {}, **MEMIT_SWITCHES},
    # SmolLM2's down-projections have no bias, so LEGACY_FT only averages the loss (golden: GPT-2)
    "ft-1": {"reference (paper's code)": {}, "tracekit 0.1 (LEGACY_FT)": LEGACY_FT},
}
# Not run here (each SmolLM2 edit costs minutes on the shared CPU; the golden part measures them all):
# C's float32 inverse (arithmetic), the paper code's never-stopping loop (identical to the reference
# wherever the reference ran all its steps: see "steps"), and MEMIT's single switches but key_average.
SMOLLM2_SKIP = {"rome": {"mom2_solve=inverse (public arithmetic)", "v_stop_on=None (the paper's code)"},
                "memit": {"z_current=mean", "value_reference=mean", "v_stop_on=nll, v_final_step=True"},
                "ft-1": set()}


def _edit(model, method: str, setup, changes: dict):
    if method == "rome":
        hp = dataclasses.replace(rome_preset(model, "error-injection"), **changes)
        return apply_rome(model, setup.request, hp.layer, hp, progress=False)
    if method == "memit":
        hp = dataclasses.replace(memit_preset(model, "error-injection"), **changes)
        return apply_memit(model, setup.request, hp.layer, hp, progress=False)
    hp = dataclasses.replace(ft_preset(model, "error-injection", 1), **changes)
    return apply_ft(model, setup.request, hp.layer, hp)


def _paper_form(model, edit, C):
    """The reference edit's v*, written with the paper's equation: W' k* = v*."""
    from tracekit.editing.delta import Edit

    hp = rome_preset(model, "error-injection")
    d = edit.info.details
    update = rank_one(C, d["key"], d["v_star"] - d["mean_output"], d["key"], hp)
    (name,) = edit.parameter_names
    weight = model.hf.get_parameter(name)
    new = model.adapter.from_out_in(model.adapter.as_out_in(weight.detach()).float() + update)
    return Edit(model.hf, {name: new}, edit.info)


def smollm2_section(methods, cases, only=None, previous=None, save=None) -> dict:
    """Rows per (method, variant) and their means; ``only``: these variants besides the reference
    (which every fact needs first: the others' update change is measured against it); rows of
    ``previous`` (an earlier run's section) for other facts or variants are kept; ``save(section)``
    is called after every fact, so an interrupted run keeps what it measured."""
    from tracekit.data import load_dataset

    model = tracekit.load_model("smollm2-135m")
    records = {r.case_id: r for r in load_dataset("counterfact") if r.case_id in cases}
    hp = rome_preset(model, "error-injection")
    C = key_statistics(model, [hp.layer], hp, progress=False)[0][hp.layer]
    text, code = MetricsConfig(essence=False), MetricsConfig(essence=False, scoring="paper-code")
    out = previous or {"methods": {}, "facts": {}}
    out.update(model=model.spec, dataset="counterfact", problem="error-injection",
               scoring="paper-text, first token (paper_code: the paper's code)",
               stats={"layer": hp.layer, "n_samples": hp.mom2_n_samples, "sample_tokens": hp.mom2_sample_tokens,
                      "corpus": "default (WikiText-2 from the data folder when found)"})
    for c in cases:
        out["facts"][str(c)] = {"prompt": records[c].text, "subject": records[c].subject, "target": records[c].target_new,
                                "target_tokens": len(model.target_ids(records[c].target_new))}
    for method in methods:
        names = [n for n in SMOLLM2_VARIANTS[method] if n not in SMOLLM2_SKIP[method]]
        names = [n for i, n in enumerate(names) if i == 0 or only is None or n in only]
        block = out["methods"].setdefault(method, {})
        for case_id in cases:
            setup = prepare(model, records[case_id], "error-injection")
            reference = first = None
            for name in names:
                changes = SMOLLM2_VARIANTS[method][name]
                started = time.perf_counter()
                edit = _paper_form(model, first, C) if changes is None else _edit(model, method, setup, changes)
                first = edit if first is None else first
                scores = evaluate_edit(model, setup, edit, text).scores
                deltas = {k: edit.delta(k).double() for k in edit.parameter_names}
                reference = deltas if reference is None else reference
                row = {"case_id": case_id, **{k: float(scores[k]) for k in SCORES},
                       "update_change": max(float((deltas[k] - reference[k]).norm() / reference[k].norm()) for k in reference),
                       "steps": edit.info.steps_taken if edit.info is not None else None}
                if edit is first:
                    coded = evaluate_edit(model, setup, edit, code).scores
                    row["paper_code"] = {k: float(coded[k]) for k in SCORES}
                    if method == "rome":
                        row["gamma"] = _gamma(C, edit, hp.mom2_ridge)
                row["seconds"] = round(time.perf_counter() - started, 1)
                rows = block.setdefault(name, {"rows": []})["rows"]
                rows[:] = [r for r in rows if r["case_id"] != case_id] + [row]
                rows.sort(key=lambda r: r["case_id"])
                log(f"{method} / {name} / case {case_id}: " + " ".join(
                    f"{k} {row[k]:.3f}" for k in (*SCORES, "update_change"))
                    + (f" gamma {row['gamma']:.3f}" if "gamma" in row else "") + f" ({row['seconds']} s)")
            for variant in block.values():
                variant["n"] = len(variant["rows"])
                variant["mean"] = _means(variant["rows"])
            if save is not None:
                save(out)
        for name, variant in block.items():
            log(f"{method} mean / {name} (n {variant['n']}): " + json.dumps(variant["mean"]))
    return out


def _means(rows: list[dict]) -> dict:
    keys = [k for k in (*SCORES, "update_change", "gamma", "steps") if rows[0].get(k) is not None]
    means = {k: statistics.fmean(r[k] for r in rows) for k in keys}
    if "paper_code" in rows[0]:
        means["paper_code"] = {k: statistics.fmean(r["paper_code"][k] for r in rows) for k in SCORES}
    if "gamma" in rows[0]:
        means["gamma_range"] = [min(r["gamma"] for r in rows), max(r["gamma"] for r in rows)]
    return means


def essence_section(cases) -> dict:
    """The essence score of ROME's reference edits, as the paper's code computes it (5 texts of 100
    tokens with the prompt, the mean of per-text perplexities) and as tracekit 0.1 did (30 new
    tokens, one pooled perplexity)."""
    from tracekit.data import load_dataset

    model = tracekit.load_model("smollm2-135m")
    records = {r.case_id: r for r in load_dataset("counterfact") if r.case_id in cases}
    configs = {"paper code (default)": MetricsConfig(),
               "tracekit 0.1": MetricsConfig(essence_new_tokens=30, essence_perplexity="pooled")}
    out: dict = {"model": model.spec, "method": "rome (reference conventions, preset)", "problem": "error-injection",
                 "rows": []}
    for case_id in cases:
        setup = prepare(model, records[case_id], "error-injection")
        edit = _edit(model, "rome", setup, {})
        row: dict = {"case_id": case_id}
        for name, config in configs.items():
            got = evaluate_edit(model, setup, edit, config)
            row[name] = {"essence": float(got.scores["essence"]), "ppl_before": got.ppl_before, "ppl_after": got.ppl_after}
        out["rows"].append(row)
        log(f"essence case {case_id}: " + json.dumps({k: v for k, v in row.items() if k != "case_id"}))
    out["n"] = len(out["rows"])
    out["mean"] = {name: {k: statistics.fmean(r[name][k] for r in out["rows"]) for k in ("essence", "ppl_before", "ppl_after")}
                   for name in configs}
    return out


def bare_section() -> dict:
    """The README's attention-sink check: ROME on a subject-first prompt with and without SmolLM2's
    document-start token, with the public code's update and with the paper's equation (same v*)."""
    from tracekit.data import load_dataset

    fact = next(f for f in load_dataset("worldfacts") if f.text == "Paris is a city in the country of")
    out: dict = {"fact": fact.text, "target": fact.target_new, "method": "rome, preset layer", "rows": []}
    for prepend in (True, False):
        model = tracekit.load_model("smollm2-135m", prepend_bos=prepend)
        setup = prepare(model, fact, "error-injection")
        p_true = float(model.target_probs([fact.text], fact.target_true)[0])
        hp = rome_preset(model, "error-injection")
        C = key_statistics(model, [hp.layer], hp, progress=False)[0][hp.layer]
        reference = _edit(model, "rome", setup, {})
        for name, edit in (("reference (public code)", reference), (PAPER_FORM, _paper_form(model, reference, C))):
            scores = evaluate_edit(model, setup, edit, MetricsConfig(essence=False)).scores
            row = {"document_start": prepend, "conventions": name, "p_true_before": p_true,
                   **{k: float(scores[k]) for k in SCORES}}
            out["rows"].append(row)
            log("bare " + json.dumps(row))
    return out


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("golden", "s3", "smollm2", "essence", "bare"))
    parser.add_argument("--methods", nargs="+", default=list(SMOLLM2_VARIANTS), choices=list(SMOLLM2_VARIANTS),
                        help="smollm2: editors to run (default: all)")
    parser.add_argument("--cases", type=int, nargs="+", default=list(COUNTERFACT_CASES),
                        help="smollm2: CounterFact case ids (default: the first six SmolLM2 knows)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="smollm2: only these variants (and the reference); default: all")
    parser.add_argument("--facts", type=int, default=len(COUNTERFACT_CASES), help="s3: facts for p_noise")
    parser.add_argument("--out", default=str(OUT), help="JSON file (its other sections are kept)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.exists() else {}
    started = time.perf_counter()
    if args.part == "golden":
        section = golden_section()
    elif args.part == "s3":
        section = s3_section(args.facts)
    elif args.part == "essence":
        section = essence_section(args.cases)
    elif args.part == "bare":
        section = bare_section()
    else:
        known = {n for m in SMOLLM2_VARIANTS.values() for n in m}
        if args.variants and set(args.variants) - known:
            parser.error(f"unknown variants {sorted(set(args.variants) - known)}")
        section = smollm2_section(args.methods, args.cases, args.variants, payload.get("smollm2"),
                                  save=lambda partial: _write(out, "smollm2", partial))
    run = {"seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": platform.machine()}
    if args.part == "smollm2":
        section.setdefault("runs", []).append({"methods": args.methods, "cases": args.cases, "variants": args.variants, **run})
    else:
        section["run"] = run
    _write(out, args.part, section)
    log(f"wrote {out} ({args.part}, {time.perf_counter() - started:.0f} s)")
    return 0


def _write(out: Path, part: str, section: dict) -> None:
    """Replace one section of the JSON file (re-read first: other parts may have written since)."""
    payload = json.loads(out.read_text()) if out.exists() else {}
    payload[part] = section
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
