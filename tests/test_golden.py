"""tracekit against the reference code's own numbers (tests/golden/reference.json), offline.

The fixture was made by tests/golden/make_golden.py, which ran kmeng01/rome, kmeng01/memit and
google/belief-localization (pinned commits, their own checkouts) on two tiny GPT-2 models: the
random ``random:gpt2-tiny`` and ``tests/golden/tiny_gpt2`` (trained for 300 steps). Every test
also runs a negative control: tracekit with one convention changed (mostly tracekit 0.1's) must
miss the reference by more than the tolerance.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from golden import tracekit_side as T
from golden.common import FACTS, FIXTURE_JSON, FIXTURE_TENSORS
from tracekit.editing.finetune import LEGACY_FT
from tracekit.editing.hparams import LEGACY
from tracing_models import one_thread  # noqa: F401  (one intra-op thread for tiny models)

FIXTURE = json.loads(FIXTURE_JSON.read_text())
CASES = {c["id"]: c for c in FIXTURE["cases"]}
RESULTS = FIXTURE["results"]


@pytest.fixture(scope="module")
def tensors():
    from safetensors.torch import load_file

    return load_file(str(FIXTURE_TENSORS))


def ids(kind: str, **match) -> list[str]:
    return [cid for cid, c in CASES.items() if c["kind"] == kind and all(c.get(k) == v for k, v in match.items())]


# Tolerances (relative Frobenius distance of the weight change): the reference inverts C in
# float32 (torch.inverse), tracekit solves in float64 by default; with C in float64, or with
# ``mom2_solve="inverse"`` (the reference's arithmetic), the two agree further.
WEIGHT_TOL = {"float32": 1e-3, "float64": 1e-5}
SAME_ARITHMETIC_TOL = 2e-4  # 9e-5 where the public decay pins a random model's v*
P_ABS = 5e-5  # p(target) after the edit, equal to 4 decimals
SCORE_REL = 1e-3  # scores and essence perplexities (rounding through the edit's 1e-5..1e-4 differences)
# The trained model's C in float32 is ill-conditioned (cond 1e6-2e6; the random model's 4e3): its
# float32 inverse, the reference's arithmetic, turns the last-bit differences of another CPU's
# forward passes into ~1e-3 of the weight change. Measured: C's trace moved by up to 4e-9
# (relative) between the fixture's machine and an AVX-512 one; C changed by 1e-9 at random moves the
# reference's own weight change by 0.8e-3-1.2e-3; tracekit then misses the fixture by 0.8e-3-1.3e-3
# (2e-6..1e-5 on the machine that made it). With C in float64 the same case agrees to 6e-6.
ILL_CONDITIONED_TOL = 3e-3
C_TRACE_REL = 1e-7  # float32 forward passes on another CPU: 4e-9; another model, layer or data: far more


def ill_conditioned(case) -> bool:
    """Whether the reference inverted the trained model's C in float32 (see ILL_CONDITIONED_TOL)."""
    return case["model"] == "trained" and case.get("c_dtype", "float32") == "float32" and case.get("alg", "ROME") == "ROME"


def test_the_models_and_key_statistics_are_the_fixtures():
    """Guard: if the models or C drift, every comparison below would be meaningless."""
    for name, expected in FIXTURE["models"].items():
        hf = T.model(name).hf
        assert sum(p.numel() for p in hf.parameters()) == expected["fingerprint"]["n_params"]
        assert float(sum(p.double().abs().sum() for p in hf.parameters())) == pytest.approx(
            expected["fingerprint"]["abs_sum"], rel=1e-9)
    for key, expected in FIXTURE["stats"].items():
        name, layer = key.split("/")
        assert float(T.second_moment(name, int(layer)).trace()) == pytest.approx(expected["trace"], rel=C_TRACE_REL)


# ---- ROME and MEMIT (kmeng01/rome, kmeng01/memit) ----------------------------------------------------
@pytest.mark.parametrize("cid", ids("rome"))
def test_rome_equals_the_public_code(cid, tensors):
    case = CASES[cid]
    reference = T.reference_deltas(case, RESULTS, tensors)
    got = T.run_rome(case)
    ill = ill_conditioned(case)
    distance = T.delta_distance(got.deltas, reference)
    assert distance < (ILL_CONDITIONED_TOL if ill else WEIGHT_TOL[case["c_dtype"]])
    assert abs(got.p_after - RESULTS[cid]["after"]["p_first"]) < P_ABS
    same = T.run_rome(case, mom2_solve="inverse")
    same_distance = T.delta_distance(same.deltas, reference)
    assert same_distance < (ILL_CONDITIONED_TOL if ill else SAME_ARITHMETIC_TOL)
    control = T.run_rome(case, **LEGACY["rome"])  # tracekit 0.1's conventions
    # it misses by ten times the float32 tolerance and ten times what tracekit misses by
    assert T.delta_distance(control.deltas, reference) > 10 * max(WEIGHT_TOL["float32"], distance, same_distance)


@pytest.mark.parametrize("cid", ids("memit"))
def test_memit_equals_the_public_code(cid, tensors):
    case = CASES[cid]
    reference = T.reference_deltas(case, RESULTS, tensors)
    got = T.run_memit(case)
    assert T.delta_distance(got.deltas, reference) < WEIGHT_TOL["float32"]
    assert abs(got.p_after - RESULTS[cid]["after"]["p_first"]) < P_ABS
    control = T.run_memit(case, **LEGACY["memit"])
    assert T.delta_distance(control.deltas, reference) > 10 * WEIGHT_TOL["float32"]


# ---- causal tracing and s3 (kmeng01/rome's calculate_hidden_flow, collect_embedding_std) ---------
@pytest.mark.parametrize("cid", ids("trace"))
def test_tracing_equals_calculate_hidden_flow(cid, tensors):
    case = CASES[cid]
    reference = tensors[f"{cid}/scores"]
    got = T.run_trace(case)
    assert float((got.p_restore - reference).abs().max()) < 1e-5
    assert got.p_noise == pytest.approx(RESULTS[cid]["low_score"], abs=1e-6)
    f = FACTS[case["fact"]]
    b, e = T.model(case["model"]).subject_span(f["prompt"].format(f["subject"]), f["subject"])
    draws = torch.from_numpy(np.random.RandomState(2).randn(case["samples"], e - b, T.model(case["model"]).d_model))
    control = T.run_trace(case, noise_draws=draws.float())  # other draws
    assert float((control.p_restore - reference).abs().max()) > 1e-4


@pytest.mark.parametrize("cid", ids("s3"))
def test_s3_equals_collect_embedding_std(cid):
    reference = RESULTS[cid]["std"]
    got = T.run_s3(CASES[cid])
    if got is None:
        pytest.skip("known_1000.json is not found here (set TRACEKIT_DATA)")
    assert got == pytest.approx(reference, rel=1e-6)
    assert abs(T.run_s3(CASES[cid], rule="tracekit-0.1") / reference - 1) > 1e-3  # unique " " + subject tokens


# ---- FT and the five problems (google/belief-localization's evaluate.py) ------------------------------
PAPER = ids("paper")


def _paper_control(case) -> dict:
    """One convention changed, per problem: what tracekit 0.1 (or the paper's text) would do."""
    if case["alg"] == "FT":
        return {"hp_changes": dict(LEGACY_FT)}
    if case["problem"] == "fact-erasure":
        return {"hp_changes": {"erasure_objective": "log-probability"}}
    if case["problem"] == "fact-forcing":
        return {"convention": "tracekit"}
    return {"hp_changes": {"v_final_step": True}}


@pytest.mark.parametrize("cid", [c for c in PAPER if CASES[c]["problem"] != "tracing-reversal"])
def test_edits_and_scores_equal_the_papers_code(cid, tensors):
    case = CASES[cid]
    ref = RESULTS[cid]
    reference = T.reference_deltas(case, RESULTS, tensors)
    setup, edit, scores = T.run_paper(case)
    assert (setup.baseline or "").strip() == ref["request"]["request_baseline"].strip()
    assert setup.request.target.strip() == ref["request"]["target_new"]["str"].strip()
    ill = ill_conditioned(case)
    distance = T.delta_distance({k: edit.delta(k) for k in edit.parameter_names}, reference)
    assert distance < (ILL_CONDITIONED_TOL if ill else WEIGHT_TOL["float32"])
    # The scoring alone: the reference's own weight change, scored by tracekit. Then tracekit's edit,
    # where the weight change reproduces across machines (ROME's float32 inverse moves the scores by
    # up to 1e-2 relative, and p(target) by 1e-3, with its ~1e-3 of the weights).
    _, _, theirs = T.run_paper(case, deltas=reference)
    for scored in (theirs,) if ill else (theirs, scores):
        mine = T.paper_scores(scored)
        for name in ("rewrite_score", "paraphrase_score", "neighborhood_score", "pre_essence_ppl", "post_essence_ppl"):
            assert mine[name] == pytest.approx(ref["scores"][name], rel=SCORE_REL, abs=1e-7), name
        rows = {(r.kind, r.role): r for r in scored.rows}
        p_ref = math.exp(-ref["post"]["rewrite_prompts_probs"][0]["target_new"])
        assert abs(rows[("rewrite", "target")].p_after - p_ref) < P_ABS
    control = _paper_control(case)
    setup, edit, _ = T.run_paper(case, **control)
    changed = {k: edit.delta(k) for k in edit.parameter_names}
    assert sorted(changed) != sorted(reference) or T.delta_distance(changed, reference) > 10 * WEIGHT_TOL["float32"]


@pytest.mark.parametrize("cid", [c for c in PAPER if CASES[c]["problem"] == "tracing-reversal"])
def test_tracing_reversal_samples_the_papers_o_noise(cid):
    """The paper's code samples o_noise from one noised run (generate_fast, top-k 5, 12 tokens with
    the prompt) and targets the decoded text, prompt included; tracekit targets the continuation."""
    case = CASES[cid]
    f = FACTS[case["fact"]]
    prompt = f["prompt"].format(f["subject"])
    setup, _, _ = T.run_paper(case)
    assert prompt + setup.request.target == RESULTS[cid]["request"]["target_new"]["str"]
    from tracekit.editing.problems import noised_continuation

    # the control: one token more than the paper's 12
    longer = noised_continuation(T.model(case["model"]), prompt, f["subject"], _paper_noise(case), max_tokens=13)
    assert prompt + longer != RESULTS[cid]["request"]["target_new"]["str"]


def _paper_noise(case):
    from tracekit.editing.subject_noise import make_subject_noise

    f = FACTS[case["fact"]]
    return make_subject_noise(T.model(case["model"]), f["prompt"].format(f["subject"]), f["subject"],
                              noise=case["hparams"]["editing_noise"], seed=case.get("seed", 0))


def test_paper_code_scores_differ_from_the_papers_text(tensors):
    """Negative control for the scoring itself: the paper's text (first-token p, every prompt)."""
    case = CASES["paper/ft-5/error-injection"]
    _, _, text_scores = T.run_paper(case, scoring="paper-text")
    ref = RESULTS[case["id"]]["scores"]
    assert abs(text_scores.scores["rewrite"] - ref["rewrite_score"]) > 1e-3 or \
        abs(text_scores.scores["paraphrase"] - ref["paraphrase_score"]) > 1e-3
