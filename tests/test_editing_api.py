"""``tracekit.edit`` and ``tracekit edit``: dispatch, results, Fact Forcing's noisy evaluation, bad input."""

import math

import pytest
import torch

import tracekit
from tracekit import TracekitError
from tracekit.cli import main
from tracekit.data import FactRecord
from tracekit.editing import metrics as M
from tracekit.editing.api import EditResult, edit
from tracekit.editing.finetune import FTHyperParams
from tracekit.editing.logprobs import text_query, token_logprobs
from tracekit.editing.problems import prepare
from tracekit.editing.request import EditRequest

from conftest import TINY_SPECS, tiny

RECORD = FactRecord(
    case_id=0, prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_true=" French",
    target_new=" English", paraphrase_prompts=("She spoke. The mother tongue of Danielle Darrieux is",),
    neighborhood_prompts=("The mother tongue of Michael Jordan is", "The capital of France is"))
STRONG = FTHyperParams(lr=5e-2, norm_constraint=5e-2, stop_loss=None)
FAST = M.MetricsConfig(essence_new_tokens=6)


def _params(model):
    return {n: p.detach().clone() for n, p in model.hf.named_parameters()}


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_edit_ft1_returns_scores_and_leaves_model_unchanged(spec):
    model = tiny(spec)
    before = _params(model)
    result = tracekit.edit(model, RECORD, method="ft-1", problem="error-injection", layer=2, hparams=STRONG, metrics=FAST)
    assert isinstance(result, EditResult) and not result.edit.applied
    assert all(torch.equal(before[n], p) for n, p in model.hf.named_parameters())
    s = result.scores.scores
    assert s["rewrite"] > 0 and s["efficacy_magnitude"] > -1
    assert set(s) == {"rewrite", "paraphrase", "neighborhood", "overall", "essence", "efficacy_success",
                      "efficacy_magnitude", "paraphrase_success", "paraphrase_magnitude", "neighborhood_success",
                      "neighborhood_magnitude"}
    assert not any(math.isnan(v) for v in s.values())
    row = result.row()
    assert row["method"] == "ft-1" and row["layer"] == 2 and row["layers"] == [2] and row["problem"] == "error-injection"
    assert row["p_target_after"] > row["p_target_before"] and "first token" in row["scoring"]
    assert row["hparams"]["norm_constraint"] == 0.05


def test_leave_applied_and_bare_request():
    model = tiny("random:gpt2-tiny")
    before = _params(model)
    request = EditRequest(RECORD.prompt, RECORD.subject, " Paris")
    result = edit(model, request, method="ft-1", layer=1, hparams=STRONG, leave_applied=True, metrics=FAST)
    assert result.edit.applied and result.problem is None
    assert not all(torch.equal(before[n], p) for n, p in model.hf.named_parameters())
    result.edit.undo()
    assert all(torch.equal(before[n], p) for n, p in model.hf.named_parameters())
    s = result.scores.scores
    assert s["rewrite"] > 0 and math.isnan(s["neighborhood"]) and math.isnan(s["efficacy_success"])
    assert edit(model, request, method="ft-1", layer=1, hparams=STRONG, evaluate=False).scores is None


def test_ft5_through_edit_on_six_layers():
    from test_editing_ft import six_layers

    model = six_layers("llama")
    result = edit(model, RECORD, method="ft-5", layer=3, hparams=FTHyperParams(n_layers=5, lr=0.1, norm_constraint=0.1),
                  metrics=M.MetricsConfig(essence=False))
    assert result.layers == [1, 2, 3, 4, 5] and len(result.edit.parameter_names) == 5
    assert result.scores.scores["rewrite"] > 0 and math.isnan(result.scores.scores["essence"])


def test_fact_forcing_scores_under_the_noise():
    """The edit is made on the noised subject, and scored with the same noise on the subject."""
    model = tiny("random:gptj-tiny")
    result = edit(model, RECORD, method="ft-1", problem="fact-forcing", layer=1, hparams=STRONG, seed=3,
                  metrics=M.MetricsConfig(essence=False), convention="tracekit")
    noise = result.request.noise
    assert noise is not None and result.row()["noise_scale"] == pytest.approx(noise.scale.scale)
    rows = {(r.kind, r.role): r for r in result.scores.rows}
    assert rows[("rewrite", "target")].noised and rows[("paraphrase", "target")].noised
    assert not rows[("neighborhood", "true")].noised
    noised_q = text_query(model, RECORD.text, " French", RECORD.subject)
    clean_q = text_query(model, RECORD.text, " French")
    with result.edit:
        noised_after, clean_after = [float(lp[0].exp()) for lp in token_logprobs(model, [noised_q, clean_q], noise=noise)]
    noised_before, clean_before = [float(lp[0].exp()) for lp in token_logprobs(model, [noised_q, clean_q], noise=noise)]
    assert rows[("rewrite", "target")].p_before == pytest.approx(noised_before, rel=1e-5)
    assert rows[("rewrite", "target")].p_after == pytest.approx(noised_after, rel=1e-5)
    assert abs(noised_before - clean_before) > 1e-5  # the noise matters to the score
    assert noised_after > 2 * noised_before  # and the edit prompt with the noise shows the gain
    clean = prepare(model, RECORD, "fact-amplification")
    clean_scores = M.evaluate_edit(model, clean, result.edit, M.MetricsConfig(essence=False)).scores
    assert result.scores.scores["rewrite"] == pytest.approx(M.rewrite_score(noised_before, noised_after), rel=1e-4)
    assert clean_scores["rewrite"] != pytest.approx(result.scores.scores["rewrite"], rel=1e-3)


@pytest.mark.parametrize("convention", ["paper-code", "tracekit"])
def test_tracing_reversal_records_the_noise_behind_o_noise(convention):
    model = tiny("random:gpt2-tiny")
    try:
        result = edit(model, RECORD, method="ft-1", problem="tracing-reversal", layer=1, hparams=STRONG,
                      evaluate=False, convention=convention)
    except tracekit.editing.problems.PointSkipped:
        pytest.skip("the noised run still predicts o_true here")
    row = result.row()
    assert row["problem_convention"] == convention and row["noise_convention"] == convention
    assert row["noise_scale"] == pytest.approx(3 * row["noise_embedding_std"]) and row["noise_std_subjects"]


def test_fact_forcing_paper_code_noise_is_fresh_per_pass_and_restarts_for_scoring():
    """Paper code: the scoring pass starts a new RandomState(1) stream; the rewrite prompt is its
    first row, so its noise is the stream's first values, before and after the edit alike."""
    import numpy as np

    from tracekit.adapters import Site

    model = tiny("random:gptj-tiny")
    result = edit(model, RECORD, method="ft-1", problem="fact-forcing", layer=1, hparams=STRONG,
                  metrics=M.MetricsConfig(essence=False))
    noise = result.request.noise
    assert noise.convention == "paper-code" and result.row()["noise_convention"] == "paper-code"
    b, e = model.subject_span(RECORD.text, RECORD.subject)
    draw = torch.from_numpy(np.random.RandomState(1).randn(1, e - b, model.d_model)).float() * noise.scale.scale

    def p_noised():
        def add(h):
            h = h.clone()
            h[:, b:e] += draw
            return h
        logits = model.run(model.encode([RECORD.text]).input_ids, edits={Site("embed"): add}).logits[0, -1]
        return float(torch.softmax(logits.float(), -1)[model.target_ids(" French")[0]])

    rows = {(r.kind, r.role): r for r in result.scores.rows}
    assert rows[("rewrite", "target")].p_before == pytest.approx(p_noised(), rel=1e-5)
    with result.edit:
        assert rows[("rewrite", "target")].p_after == pytest.approx(p_noised(), rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="rome2"), "unknown edit method 'rome2'"),
    (dict(method="ft-1", problem="forcing"), "unknown editing problem 'forcing'"),
    (dict(method="ft-1", layer=9), "layer 9 is out of range"),
    (dict(method="ft-1", layer=-1), "layer -1 is out of range"),
    (dict(method="ft-5", layer=2), "at least 5 layers"),
    (dict(method="ft-5", layer=2, hparams=FTHyperParams()), "ft-5 edits 5 layer"),
    (dict(method="ft-1", layer=1, hparams=object()), "ft-1 needs FTHyperParams"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(TracekitError, match=message):
        edit(tiny("random:gpt2-tiny"), RECORD, **kwargs)


def test_bad_targets():
    model = tiny("random:gpt2-tiny")
    same = FactRecord(case_id=1, prompt=RECORD.prompt, subject=RECORD.subject, target_true=" French", target_new=" French")
    with pytest.raises(TracekitError, match="is the true object"):
        edit(model, same, method="ft-1", layer=1)
    with pytest.raises(TracekitError, match="empty target"):
        edit(model, EditRequest(RECORD.prompt, RECORD.subject, "  "), method="ft-1", layer=1)


def test_cli_edit_prints_tables(capsys):
    code = main(["edit", "--model", "random:gpt2-tiny", "--prompt", "The mother tongue of {} is", "--subject",
                 "Danielle Darrieux", "--target", " English", "--true", " French", "--method", "ft-1", "--layer", "1",
                 "--no-essence"])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("p before", "rewrite", "neighborhood", "efficacy_success", "no --paraphrase given",
                 "no --neighbor given", "first token", "N5: The mother tongue of Tokyo is"):
        assert text in out, text


def test_cli_bad_input_is_one_line(capsys):
    code = main(["edit", "--model", "random:gpt2-tiny", "--prompt", "The mother tongue of {} is", "--subject",
                 "Danielle Darrieux", "--target", " French", "--true", " French", "--method", "ft-1", "--layer", "1"])
    out = capsys.readouterr().out
    assert code == 2 and "is the true object" in out and "Traceback" not in out
    code = main(["edit", "--model", "random:gpt2-tiny", "--prompt", "The mother tongue of {} is", "--subject",
                 "Danielle Darrieux", "--target", " English", "--method", "ft-1", "--layer", "7"])
    assert code == 2 and "out of range" in capsys.readouterr().out


def test_demo_runs_end_to_end_on_a_tiny_model(capsys, tmp_path):
    # FT-1: no key statistics to gather, so this stays fast; the bundled model is the README's main job
    code = main(["demo", "--model", "random:llama-tiny", "--method", "ft-1", "--window", "2", "--samples", "2",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "object at 0x" not in out and "rewrite" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"trace-mlp.png", "trace-mlp.json", "summary.json"}
