"""Edit metrics: formulas against hand-computed values, and the batched gathering of probabilities."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from tracekit import prompts as P
from tracekit.data import FactRecord
from tracekit.editing import metrics as M
from tracekit.editing.delta import Edit
from tracekit.editing.logprobs import text_query, token_logprobs, token_logprobs_kept
from tracekit.editing.problems import prepare
from tracekit.memo import drop_memo

from conftest import BACKENDS, TINY_SPECS, tiny


# ---- pure formulas, hand-computed ---------------------------------------------------------------
def test_rewrite_score_raising_and_erasure():
    assert M.rewrite_score(0.2, 0.6) == pytest.approx(0.5)  # (0.6 - 0.2) / (1 - 0.2)
    assert M.rewrite_score(0.2, 0.1) == pytest.approx(-0.125)  # a failed edit is negative
    assert M.rewrite_score(0.4, 0.1, minimize=True) == pytest.approx(0.75)  # (0.4 - 0.1) / 0.4
    assert M.rewrite_score(0.4, 0.5, minimize=True) == pytest.approx(-0.25)
    assert math.isnan(M.rewrite_score(1.0, 1.0)) and math.isnan(M.rewrite_score(0.0, 0.0, minimize=True))


def test_paraphrase_and_neighborhood_scores():
    # paraphrases: (0.55 - 0.1) / 0.9 = 0.5 and (0.75 - 0.5) / 0.5 = 0.5
    assert M.paraphrase_score([0.1, 0.5], [0.55, 0.75]) == pytest.approx(0.5)
    # neighbours: 1 - 0.1 / (0.5 + 0.2) = 0.857143; 1 - 0.3 / (0.5 + 0.3) = 0.625
    assert M.neighborhood_score([0.3, 0.8], [0.4, 0.5]) == pytest.approx((1 - 0.1 / 0.7 + 0.625) / 2)
    assert M.neighborhood_score([0.3], [0.3]) == 1.0
    assert M.neighborhood_score([0.3], [1.0]) == pytest.approx(0.0)  # moved as far as it could
    assert M.overall_score(0.9, 0.5, 0.7) == pytest.approx(0.7)
    assert M.overall_score(0.9, math.nan, 0.7) == pytest.approx(0.8)  # only what could be computed


def test_essence_perplexity_and_unscaled():
    assert M.essence_score(10.0, 12.0) == pytest.approx(0.6)
    assert M.essence_score(10.0, 9.0) == 1.0  # slight decreases cap at 1
    assert M.essence_score(10.0, 17.0) == 0.0
    assert M.perplexity([-1.0, -2.0, -3.0]) == pytest.approx(math.exp(2.0))
    assert M.success_rate([0.5, 0.1, 0.3], [0.2, 0.2, 0.3]) == pytest.approx(1 / 3)
    assert M.magnitude([0.5, 0.1], [0.2, 0.2]) == pytest.approx(0.1)


def test_compute_scores_error_injection_example():
    before = {"rewrite": M.KindProbs(target=(0.2,), true=(0.6,), counter=(0.2,)),
              "paraphrase": M.KindProbs(target=(0.1, 0.5), true=(0.7, 0.3), counter=(0.1, 0.5)),
              "neighborhood": M.KindProbs(true=(0.3, 0.8), counter=(0.1, 0.05))}
    after = {"rewrite": M.KindProbs(target=(0.6,), true=(0.3,), counter=(0.6,)),
             "paraphrase": M.KindProbs(target=(0.55, 0.75), true=(0.4, 0.1), counter=(0.55, 0.75)),
             "neighborhood": M.KindProbs(true=(0.4, 0.5), counter=(0.2, 0.6))}
    s = M.compute_scores(before, after, minimize=False, toward_true=False, ppl_before=10.0, ppl_after=12.0)
    assert s["rewrite"] == pytest.approx(0.5)
    assert s["paraphrase"] == pytest.approx(0.5)
    assert s["neighborhood"] == pytest.approx((1 - 0.1 / 0.7 + 0.625) / 2)
    assert s["overall"] == pytest.approx((0.5 + 0.5 + s["neighborhood"]) / 3)
    assert s["essence"] == pytest.approx(0.6)
    assert s["efficacy_success"] == 1.0 and s["efficacy_magnitude"] == pytest.approx(0.3)
    assert s["paraphrase_success"] == 1.0 and s["paraphrase_magnitude"] == pytest.approx((0.15 + 0.65) / 2)
    # neighbours: o_true 0.4 > 0.2 holds, 0.5 > 0.6 fails
    assert s["neighborhood_success"] == 0.5 and s["neighborhood_magnitude"] == pytest.approx((0.2 - 0.1) / 2)


def test_compute_scores_fact_erasure_and_amplification():
    before = {"rewrite": M.KindProbs(target=(0.4,), true=(0.4,), counter=(0.1,)),
              "paraphrase": M.KindProbs(target=(0.5, 0.2), true=(0.5, 0.2), counter=(0.1, 0.1))}
    after = {"rewrite": M.KindProbs(target=(0.1,), true=(0.1,), counter=(0.3,)),
             "paraphrase": M.KindProbs(target=(0.25, 0.3), true=(0.25, 0.3), counter=(0.2, 0.1))}
    s = M.compute_scores(before, after, minimize=True, toward_true=False)
    assert s["rewrite"] == pytest.approx(0.75)  # (0.4 - 0.1) / 0.4
    assert s["paraphrase"] == pytest.approx((0.5 + -0.5) / 2)  # (0.5-0.25)/0.5, (0.2-0.3)/0.2
    assert s["efficacy_success"] == 1.0 and s["efficacy_magnitude"] == pytest.approx(0.2)  # o_false 0.3 > o_true 0.1
    assert math.isnan(s["neighborhood"]) and math.isnan(s["essence"])
    assert s["overall"] == pytest.approx(0.375)
    amplified = M.compute_scores(before, after, minimize=False, toward_true=True)
    assert amplified["efficacy_success"] == 0.0 and amplified["efficacy_magnitude"] == pytest.approx(-0.2)


# ---- gathering probabilities on tiny models -------------------------------------------------------
@pytest.mark.parametrize("spec", TINY_SPECS)
def test_token_logprobs_equal_full_forward(spec):
    model = tiny(spec)
    prompts = ["The Eiffel Tower is located in the city of", "The capital of France is", "The capital of France is"]
    objects = [" Paris", " Paris Tower of", " Rome"]
    got = token_logprobs(model, [text_query(model, p, o) for p, o in zip(prompts, objects)])
    assert [len(g) for g in got] == [1, 3, 1]
    reference = model.sequence_logprobs(prompts, objects)
    assert torch.allclose(torch.stack([g.sum() for g in got]), reference, atol=1e-5)
    assert torch.allclose(got[0][0].exp(), model.target_probs([prompts[0]], " Paris")[0], atol=1e-6)


RECORD = FactRecord(
    case_id=0, prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_true=" French",
    target_new=" English", paraphrase_prompts=("She spoke. The mother tongue of Danielle Darrieux is",),
    neighborhood_prompts=("The mother tongue of Michael Jordan is", "The capital of France is"))


def _bump_edit(model, layer=1, scale=0.05):
    weight = model.adapter.down_proj_weight(model.hf, layer)
    name = next(n for n, p in model.hf.named_parameters() if p is weight)
    gen = torch.Generator().manual_seed(3)
    return Edit(model.hf, {name: weight + scale * torch.randn(weight.shape, generator=gen)})


def _logps(model, rows):
    out = []
    for row in rows:
        ids = torch.tensor([row])
        with torch.no_grad():
            logp = torch.log_softmax(model.hf(ids).logits[0].float(), dim=-1)
        out.append(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]])
    return out


def _perplexity(model, rows):
    """The paper code's essence perplexity: per text exp(-sum log p / n_tokens), the mean over texts."""
    return float(np.mean([math.exp(-float(lp.sum()) / (len(lp) + 1)) for lp in _logps(model, rows)]))


def _pooled_perplexity(model, rows):
    """tracekit 0.1: pooled over every token after the first."""
    return math.exp(-float(torch.cat(_logps(model, rows)).mean()))


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_evaluate_edit_matches_separate_forward_passes(spec):
    model = tiny(spec)
    setup = prepare(model, RECORD, "error-injection")
    edit = _bump_edit(model)
    config = M.MetricsConfig(essence_new_tokens=8)
    result = M.evaluate_edit(model, setup, edit, config)
    assert not edit.applied
    rows = M.sample_essence_tokens(model, RECORD.subject, config)
    prompts = [RECORD.text, *RECORD.paraphrase_prompts]
    p_before = model.target_probs(prompts, " English")
    n_before = model.target_probs(list(RECORD.neighborhood_prompts), " French")
    with edit:
        p_after = model.target_probs(prompts, " English")
        n_after = model.target_probs(list(RECORD.neighborhood_prompts), " French")
        ppl_after = _perplexity(model, rows)
    ppl_before = _perplexity(model, rows)
    expected_rewrite = M.rewrite_score(float(p_before[0]), float(p_after[0]))
    assert result.scores["rewrite"] == pytest.approx(expected_rewrite, rel=1e-4, abs=1e-7)
    assert result.scores["paraphrase"] == pytest.approx(M.rewrite_score(float(p_before[1]), float(p_after[1])), rel=1e-4, abs=1e-7)
    assert result.scores["neighborhood"] == pytest.approx(M.neighborhood_score(n_before.tolist(), n_after.tolist()), abs=1e-5)
    assert len(result.essence_texts) == 5 and all(t.startswith("Danielle Darrieux is a") for t in result.essence_texts)
    assert result.ppl_before == pytest.approx(ppl_before, rel=1e-4)
    assert result.ppl_after == pytest.approx(ppl_after, rel=1e-4)
    assert result.scores["essence"] == pytest.approx(M.essence_score(ppl_before, ppl_after), abs=1e-3)
    assert "first token" in result.scoring
    pooled = M.evaluate_edit(model, setup, edit, M.MetricsConfig(essence_new_tokens=8, essence_perplexity="pooled"))
    assert pooled.ppl_before == pytest.approx(_pooled_perplexity(model, rows), rel=1e-4)


def test_paper_code_scoring_uses_whole_objects_and_first_prompts():
    """make_editing_results_df: p of the whole " " + object, the first paraphrase and neighbour
    only, the neighbourhood score on p(target), floors at 2e-8."""
    model = tiny("random:gpt2-tiny")
    record = dataclasses.replace(RECORD, target_new=" English French",
                                 paraphrase_prompts=(*RECORD.paraphrase_prompts, "Darrieux talk. Danielle Darrieux speaks"))
    setup = prepare(model, record, "error-injection")
    edit = _bump_edit(model)
    result = M.evaluate_edit(model, setup, edit, M.MetricsConfig(scoring="paper-code", essence=False))
    prompts = [record.text, record.paraphrase_prompts[0], record.neighborhood_prompts[0]]

    def seq_p():
        return [float(model.sequence_logprobs([p], [" English French"])[0].exp()) for p in prompts]

    before = seq_p()
    with edit:
        after = seq_p()
    s = result.scores
    assert s["rewrite"] == pytest.approx(max(2e-8, 1 - (1 - after[0]) / (1 - before[0])), rel=1e-4, abs=1e-12)
    assert s["paraphrase"] == pytest.approx(max(2e-8, 1 - (1 - after[1]) / (1 - before[1])), rel=1e-4, abs=1e-12)
    assert s["neighborhood"] == pytest.approx(1 - abs(after[2] - before[2]) / (abs(before[2] - 0.5) + 0.5), rel=1e-6)
    assert "whole object" in result.scoring
    assert M.paper_code_scores(0.3, 0.1, minimize=False) == 2e-8 and M.paper_code_scores(0.3, 0.4, minimize=True) == 0.0


def test_essence_texts_are_seeded():
    model = tiny("random:gpt2-tiny")
    a = M.sample_essence_texts(model, "Toko Yasuda", M.MetricsConfig(essence_new_tokens=6, seed=1))
    drop_memo(model, "essence_texts")
    assert not any(k.startswith("_") for k in vars(model))  # nothing kept on the model itself
    b = M.sample_essence_texts(model, "Toko Yasuda", M.MetricsConfig(essence_new_tokens=6, seed=1))
    c = M.sample_essence_texts(model, "Toko Yasuda", M.MetricsConfig(essence_new_tokens=6, seed=2))
    assert a == b and a != c and len(set(a)) > 1


def test_essence_sampling_with_the_cache_equals_whole_passes():
    """The key/value cache changes the cost of sampling, not the texts: a reference sampler
    running one whole forward pass per new token draws the same tokens."""
    model = tiny("random:llama-tiny")
    config = M.MetricsConfig(essence_new_tokens=12, seed=5)
    prompt = P.token_ids(model.tokenizer, M.ESSENCE_PROMPT.format("Toko Yasuda"))
    rows, gen = [list(prompt) for _ in range(config.essence_samples)], torch.Generator().manual_seed(config.seed)
    for _ in range(config.essence_new_tokens):
        logits = model.run(torch.tensor(rows), positions=torch.full((len(rows),), len(rows[0]) - 1)).logits.float()
        top_logits, top_ids = logits.topk(config.essence_top_k, dim=-1)
        picks = torch.multinomial(torch.softmax(top_logits, dim=-1), 1, generator=gen)
        for row, token in zip(rows, top_ids.gather(1, picks)[:, 0].tolist()):
            row.append(token)
    assert M.sample_essence_tokens(model, "Toko Yasuda", config) == [tuple(r) for r in rows]
    assert len(set(map(tuple, rows))) > 1


def test_essence_texts_are_the_same_on_every_backend():
    config = M.MetricsConfig(essence_new_tokens=5, seed=3)
    texts = [M.sample_essence_tokens(tiny("random:gptj-tiny", backend), "Toko Yasuda", config) for backend in BACKENDS]
    assert texts[0] == texts[1] == texts[2]


def test_a_sweep_runs_each_points_before_pass_once(monkeypatch):
    model = tiny("random:llama-tiny")
    setup = prepare(model, RECORD, "error-injection")
    config = M.MetricsConfig(essence_new_tokens=4)
    first, second = _bump_edit(model), _bump_edit(model, scale=0.5)
    plain = [M.evaluate_edit(model, setup, e, config).scores for e in (first, second)]
    passes = []
    monkeypatch.setattr(M, "token_logprobs", lambda m, q, **k: passes.append(len(q)) or token_logprobs(m, q, **k))
    monkeypatch.setattr(M, "token_logprobs_kept", lambda m, q, **k: passes.append(len(q)) or token_logprobs_kept(m, q, **k))
    with M.baseline_cached(model):
        cached = [M.evaluate_edit(model, setup, e, config).scores for e in (first, second)]
    assert len(passes) == 6  # one "before" (prompts, essence texts), two "after"
    assert cached == plain
    M.evaluate_edit(model, setup, first, config)
    assert len(passes) == 10  # outside the block nothing is reused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", TINY_SPECS)
def test_an_after_pass_from_the_kept_block_inputs_equals_a_whole_pass(spec, backend):
    """Starting at the edit's lowest layer from a "before" pass's block inputs gives the whole
    pass's log-probabilities (rows found across two kept passes, one of them only in part)."""
    model = tiny(spec, backend)
    prompts = [RECORD.text, *RECORD.paraphrase_prompts]
    queries = [text_query(model, p, o) for p in prompts for o in (" English", " French")]
    essence = [text_query(model, "Danielle Darrieux is a", " singer from Paris, France")]
    _, kept_q = token_logprobs_kept(model, queries)
    _, kept_e = token_logprobs_kept(model, essence)
    edit = _bump_edit(model, layer=2, scale=0.2)
    assert M.lowest_changed_layer(model, edit) == 2
    mixed = queries[1:] + essence
    with edit:
        whole = token_logprobs(model, mixed)
        resumed = token_logprobs(model, mixed, start=(2, [kept_q, kept_e]))
        missing = token_logprobs(model, mixed + [text_query(model, "Paris is in", " France")], start=(2, [kept_q]))
    unedited = token_logprobs(model, mixed)
    for a, b, c, d in zip(whole, resumed, missing, unedited):
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
        assert not torch.allclose(a, d, atol=1e-3)  # the edit reaches every row


def test_lowest_changed_layer_is_none_outside_the_blocks():
    model = tiny("random:gpt2-tiny")
    embed = next(n for n, p in model.hf.named_parameters() if p.dim() == 2)
    assert M.lowest_changed_layer(model, Edit(model.hf, {embed: dict(model.hf.named_parameters())[embed] + 1})) is None
    assert M.lowest_changed_layer(model, _bump_edit(model, layer=0)) == 0


def test_a_batch_of_points_keeps_every_points_block_inputs_at_hand(monkeypatch):
    """evaluate_edits over more points than the kept-pass floor: every after-pass starts at the
    edit's layer (no point's kept inputs evicted by the next point's before-passes)."""
    from tracekit.data.loaders import load_dataset

    model = tiny("random:llama-tiny")
    setups = [prepare(model, r, "error-injection") for r in load_dataset("worldfacts", None, 4)]
    edits = [_bump_edit(model, layer=2, scale=0.1 * (i + 1)) for i in range(len(setups))]
    config = M.MetricsConfig(essence_new_tokens=4)
    starts = []
    original = model.backend.forward
    monkeypatch.setattr(model.backend, "forward", lambda *a, **k: starts.append(k.get("start_layer")) or original(*a, **k))
    with M.baseline_cached(model):
        together = M.evaluate_edits(model, setups, edits, config)
    after = starts[-2:]  # the prompts' pass and the essence texts' pass
    assert after == [2, 2]
    alone = [M.evaluate_edit(model, s, e, config) for s, e in zip(setups, edits)]
    for a, b in zip(together, alone):
        assert a.scores["rewrite"] == pytest.approx(b.scores["rewrite"], rel=1e-4, abs=1e-7)
