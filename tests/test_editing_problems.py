"""The five editing problems map a fact record to the right request and evaluation targets."""

import dataclasses

import pytest
import torch

from tracekit import TracekitError
from tracekit.data import FactRecord
from tracekit.editing import problems as PR
from tracekit.editing.problems import PointSkipped, Problem, prepare
from tracekit.tracing import noised_prediction, scaled_noise
from tracekit.tracing.noise import noise_scale, subject_noise_bump

from conftest import tiny

RECORD = FactRecord(
    case_id=7, prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_true=" French",
    target_new=" English", paraphrase_prompts=("She spoke. The mother tongue of Danielle Darrieux is",),
    neighborhood_prompts=("The mother tongue of Michael Jordan is",))
COUNTERFACT = {
    "case_id": 0, "pararel_idx": 2796,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"},
                          "subject": "Danielle Darrieux"},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of"],
    "attribute_prompts": [], "generation_prompts": [],
}


def test_problem_names_parse():
    assert [p.value for p in Problem] == ["error-injection", "tracing-reversal", "fact-erasure",
                                          "fact-amplification", "fact-forcing"]
    assert Problem.parse("Fact_Forcing") is Problem.FACT_FORCING
    assert Problem.FACT_ERASURE.minimize and not Problem.ERROR_INJECTION.minimize
    assert Problem.FACT_FORCING.toward_true and Problem.FACT_AMPLIFICATION.toward_true
    with pytest.raises(TracekitError, match="unknown editing problem 'fact-forging'.*fact-forcing"):
        Problem.parse("fact-forging")


def test_error_injection_and_amplification_targets():
    model = tiny("random:gpt2-tiny")
    ei = prepare(model, RECORD, "error-injection")
    assert (ei.request.target, ei.o_true, ei.counter, ei.request.minimize) == (" English", " French", " English", False)
    assert ei.request.text == RECORD.text and ei.request.noise is None
    assert ei.paraphrases == RECORD.paraphrase_prompts and ei.neighbours == RECORD.neighborhood_prompts
    fa = prepare(model, RECORD, Problem.FACT_AMPLIFICATION)
    assert (fa.request.target, fa.counter, fa.toward_true) == (" French", " English", True)


def test_counterfact_dict_is_accepted():
    model = tiny("random:gpt2-tiny")
    setup = prepare(model, COUNTERFACT, "error-injection")
    assert (setup.request.target, setup.o_true) == (" English", " French")
    assert setup.neighbours == ("Michel Rocard is a native speaker of",)
    with pytest.raises(TracekitError, match="requested_rewrite"):
        prepare(model, {"case_id": 1}, "error-injection")


def test_fact_erasure_needs_p_true_above_threshold(monkeypatch):
    model = tiny("random:gpt2-tiny")
    p_true = float(model.target_probs([RECORD.text], " French")[0])
    assert p_true < PR.ERASURE_MIN_P  # a random model knows nothing
    with pytest.raises(PointSkipped, match="p\\(o_true\\) >= 0.02"):
        prepare(model, RECORD, "fact-erasure")
    monkeypatch.setattr(PR, "ERASURE_MIN_P", p_true / 2)
    fe = prepare(model, RECORD, "fact-erasure")
    assert (fe.request.target, fe.request.minimize, fe.counter) == (" French", True, " English")


def test_tracing_reversal_targets_the_noised_prediction():
    model = tiny("random:llama-tiny")
    found = noised_prediction(model, RECORD.text, RECORD.subject, samples=10, seed=4)
    tr = prepare(model, RECORD, "tracing-reversal", seed=4, convention="tracekit")
    assert tr.request.target == found.token and tr.counter == found.token and tr.o_true == " French"
    assert model.target_ids(tr.request.target)[0] == found.token_id
    same = FactRecord(case_id=1, prompt=RECORD.prompt, subject=RECORD.subject, target_true=found.token, target_new=None)
    with pytest.raises(PointSkipped, match="still predicts o_true"):
        prepare(model, same, "tracing-reversal", seed=4, convention="tracekit")


def test_tracing_reversal_paper_code_samples_a_noised_continuation():
    """The paper's code: o_noise is generate_fast's top-k (5) sample, to 12 tokens in all, of one
    noised run (RandomState(1) draw); the continuation is the target."""
    import numpy as np

    from tracekit.adapters import Site
    from tracekit import prompts as P

    model = tiny("random:gpt2-tiny")
    tr = prepare(model, RECORD, "tracing-reversal", seed=0)
    ids = P.token_ids(model.tokenizer, RECORD.text)
    b, e = model.subject_span(RECORD.text, RECORD.subject)
    scale = noise_scale(model, "s3")
    draw = torch.from_numpy(np.random.RandomState(1).randn(1, e - b, model.d_model)).float() * scale
    gen, new = torch.Generator().manual_seed(0), []
    while len(ids) + len(new) < 12 or not new:
        def noised(h, draw=draw):
            h = h.clone()
            h[:, b:e] += draw
            return h
        logits = model.run(torch.tensor([ids + new]), edits={Site("embed"): noised}).logits[0, -1]
        probs = torch.softmax(logits.float(), -1)
        top = torch.topk(probs, 5).indices
        new.append(int(top[torch.multinomial(probs[top] / probs[top].sum(), 1, generator=gen)]))
    assert tr.request.target == model.tokenizer.decode(new)
    assert tr.baseline == RECORD.target_true and tr.counter == tr.request.target


def test_fact_forcing_carries_the_tracer_noise():
    model = tiny("random:gptj-tiny")
    ff = prepare(model, RECORD, "fact-forcing", seed=5, convention="tracekit")
    start, end = model.subject_span(RECORD.text, RECORD.subject)
    # "Danielle Darrieux" is 2 tokens after a space but 4 at a text's start (a context template's
    # KL prompt): the draw covers the longest, and each prompt noises its subject with the last rows
    longest = len(model.target_ids(RECORD.subject))
    assert (end - start, longest) == (2, 4)
    noise = ff.request.noise
    assert ff.request.target == " French" and noise.draw.shape == (longest, model.d_model)
    assert torch.equal(noise.draw, scaled_noise(model, 1, longest, "s3", 5)[0])
    bump = subject_noise_bump((1, 8, model.d_model), [(start, end)], *noise.eval_plan(None, [(start, end)])[1:])
    assert torch.equal(bump[0, start:end], noise.draw[-2:])  # aligned to the subject's end
    assert noise.as_dict()["noise_scale"] == pytest.approx(noise_scale(model, "s3"))  # recorded
    other = prepare(model, RECORD, "fact-forcing", seed=6, convention="tracekit")
    assert not torch.equal(noise.draw, other.request.noise.draw)


def test_fact_forcing_paper_code_names_o_noise_as_baseline():
    model = tiny("random:gptj-tiny")
    ff = prepare(model, RECORD, "fact-forcing", seed=0, noised_rows=10)
    assert ff.request.noise.convention == "paper-code" and ff.request.noise.fresh_per_pass
    import numpy as np

    b, e = model.subject_span(RECORD.text, RECORD.subject)
    draws = torch.from_numpy(np.random.RandomState(1).randn(10, e - b, model.d_model)).float()
    found = noised_prediction(model, RECORD.text, RECORD.subject, noise=ff.request.noise.scale.scale, noise_draws=draws)
    assert ff.counter == found.token and ff.baseline == " " + found.token  # the scorer reads " " + baseline


def test_fact_forcing_scores_a_paraphrase_whose_subject_tokenises_longer():
    model = tiny("random:gptj-tiny")
    record = dataclasses.replace(RECORD, paraphrase_prompts=("(Danielle Darrieux) spoke the language",))
    ff = prepare(model, record, "fact-forcing", seed=5, convention="tracekit")
    span = model.subject_span(record.paraphrase_prompts[0], record.subject)
    spans, draws, align = ff.request.noise.eval_plan(None, [span])
    bump = subject_noise_bump((1, 10, model.d_model), spans, draws, align)
    assert span[1] - span[0] == 4 and torch.equal(bump[0, span[0]:span[1]], ff.request.noise.draw[-4:])
    with pytest.raises(TracekitError, match="noise covers only 2"):
        subject_noise_bump((1, 10, model.d_model), spans, ff.request.noise.draw[None, -2:], align)


def test_bad_records():
    model = tiny("random:gpt2-tiny")
    no_false = FactRecord(case_id=2, prompt=RECORD.prompt, subject=RECORD.subject, target_true=" French", target_new=None)
    with pytest.raises(TracekitError, match="needs a false target"):
        prepare(model, no_false, "error-injection")
    same = FactRecord(case_id=3, prompt=RECORD.prompt, subject=RECORD.subject, target_true=" French", target_new="French")
    with pytest.raises(TracekitError, match="is the true object"):
        prepare(model, same, "error-injection")
    with pytest.raises(TracekitError, match="expected a FactRecord"):
        prepare(model, 42, "error-injection")
