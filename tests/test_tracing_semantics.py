"""What tracing and zeroing mean: boundary cases, seeds, explicit noise, zeroing, bad input."""

import pytest
import torch

from tracekit import TracekitError
from tracekit.adapters.architectures import _get
from tracekit.tracing import (
    draw_noise, noise_scale, noised_prediction, scaled_noise, subject_noise_hook, trace, window_layers, zero_trace,
)
from tracekit.tracing import engine as E
from tracekit.tracing.trace import _clean
from tracekit.tracing.plan import prepare_prompt
from tracing_models import PROMPT, SUBJECT, deep, one_thread, sharp  # noqa: F401

PREFIXED = "Where is it? The Eiffel Tower is located in the city of"


@pytest.mark.parametrize("layer, window, n_layers, expected", [
    (0, 10, 30, range(0, 5)), (5, 10, 30, range(0, 10)), (6, 10, 30, range(1, 11)), (29, 10, 30, range(24, 30)),
    (10, 5, 30, range(8, 13)), (0, 5, 30, range(0, 3)), (29, 5, 30, range(27, 30)), (7, 1, 30, range(7, 8)),
    (5, 4, 30, range(3, 7)), (2, 4, 4, range(0, 4)), (3, 3, 4, range(2, 4)),
])
def test_window_edges_follow_method_notes(layer, window, n_layers, expected):
    assert window_layers(layer, window, n_layers) == expected


@pytest.mark.parametrize("engine", ("fast", "generic"))
@pytest.mark.parametrize("kind", ("mlp", "attn", "resid"))
def test_restoring_tokens_before_the_subject_changes_nothing(engine, kind):
    """Causal attention: states before the subject are the same clean or noised, so p_restore == p_noise."""
    model = sharp("random:gpt2-tiny")
    result = trace(model, PREFIXED, SUBJECT, kind=kind, window=3, samples=3, engine=engine)
    before = result.subject_span[0]
    assert before > 0
    assert (result.p_restore[:before] - result.p_noise).abs().max() <= 1e-6
    assert (result.p_restore[before:] - result.p_noise).abs().max() > 1e-3


@pytest.mark.parametrize("engine", ("fast", "generic"))
def test_rows_without_restoration_give_p_noise(engine):
    model = deep("llama")
    prompt = prepare_prompt(model, PROMPT, SUBJECT, None)
    p_clean, clean = _clean(model, prompt, "mlp")
    noise = scaled_noise(model, 3, 3, "s3", seed=0)
    rows = E.Rows(torch.arange(3), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                  torch.zeros(3, prompt.length, dtype=torch.bool))
    job = E.Job(prompt.input_ids, prompt.answer_id, "mlp", rows, clean, noise, 0)
    run = E.run_fast if engine == "fast" else E.run_generic
    p_rows, p_base = run(model, job)
    assert torch.allclose(p_rows, p_base, atol=1e-7)
    assert abs(float(p_base.mean()) - trace(model, PROMPT, SUBJECT, samples=3, engine=engine).p_noise) <= 1e-6
    assert abs(float(p_base.mean()) - p_clean) > 1e-3


@pytest.mark.parametrize("engine", ("fast", "generic"))
def test_restoring_the_last_layer_residual_gives_p_clean(engine):
    model = deep("gptj")
    result = trace(model, PROMPT, SUBJECT, kind="resid", window=1, samples=3, engine=engine)
    assert abs(float(result.p_restore[-1, -1]) - result.p_clean) <= 1e-6  # last token, last layer
    # ... and restoring the last layer at every token at once (one row of the engine):
    prompt = prepare_prompt(model, PROMPT, SUBJECT, None)
    _, clean = _clean(model, prompt, "resid")
    L = model.n_layers
    rows = E.Rows(torch.tensor([0]), torch.tensor([L - 1]), torch.tensor([L]), torch.ones(1, prompt.length, dtype=torch.bool))
    job = E.Job(prompt.input_ids, prompt.answer_id, "resid", rows, clean, scaled_noise(model, 1, 3, "s3"), 0)
    p_rows, _ = (E.run_fast if engine == "fast" else E.run_generic)(model, job)
    assert abs(float(p_rows[0]) - result.p_clean) <= 1e-6


def test_same_seed_same_numbers_different_seed_different_noise():
    model = sharp("random:llama-tiny")
    a = trace(model, PROMPT, SUBJECT, window=3, samples=3, seed=5)
    b = trace(model, PROMPT, SUBJECT, window=3, samples=3, seed=5)
    c = trace(model, PROMPT, SUBJECT, window=3, samples=3, seed=6)
    assert torch.equal(a.p_restore, b.p_restore) and a.p_noise == b.p_noise
    assert a.p_noise != c.p_noise
    assert (a.p_restore - c.p_restore).abs().max() > 1e-4
    assert not torch.equal(draw_noise(3, 3, 8, seed=5), draw_noise(3, 3, 8, seed=6))


def test_explicit_noise_draws_reproduce_a_seeded_trace():
    model = sharp("random:gptj-tiny")
    seeded = trace(model, PROMPT, SUBJECT, window=3, samples=4, seed=11)
    draws = draw_noise(4, 3, model.d_model, seed=11)
    given = trace(model, PROMPT, SUBJECT, window=3, noise_draws=draws)
    assert torch.equal(seeded.p_restore, given.p_restore)
    other = torch.randn(2, 3, model.d_model, generator=torch.Generator().manual_seed(99))
    fast = trace(model, PROMPT, SUBJECT, window=3, noise_draws=other, engine="fast")
    generic = trace(model, PROMPT, SUBJECT, window=3, noise_draws=other, engine="generic")
    assert fast.config["samples"] == 2
    assert (fast.p_restore - generic.p_restore).abs().max() <= 1e-6
    with pytest.raises(TracekitError, match="noise_draws has shape"):
        trace(model, PROMPT, SUBJECT, window=3, noise_draws=torch.zeros(2, 2, model.d_model))


def test_noise_scale_rules():
    model = sharp("random:gpt2-tiny")
    assert noise_scale(model, 0.5) == 0.5
    assert noise_scale(model, "s3") == pytest.approx(3 * noise_scale(model, "s1"))
    uniform = trace(model, PROMPT, SUBJECT, window=3, samples=2, noise="u0.2")
    assert uniform.config["noise"] == "u0.2" and uniform.config["noise_scale"] == pytest.approx(0.2)
    relative = trace(model, PROMPT, SUBJECT, window=3, samples=2, noise="s3")  # the std's source is recorded
    assert relative.config["noise_std_subjects"].split(" ")[0] in ("known_1000", "fallback")
    assert relative.config["noise_scale"] == pytest.approx(3 * relative.config["noise_embedding_std"])


def test_subject_noise_hook_adds_noise_at_the_span_only():
    hidden = torch.randn(2, 6, 4)
    noise = torch.randn(2, 2, 4)
    out = subject_noise_hook(noise, 1)(hidden)
    assert torch.equal(out[:, 1:3], hidden[:, 1:3] + noise)
    assert torch.equal(out[:, [0, 3, 4, 5]], hidden[:, [0, 3, 4, 5]])
    per_row = subject_noise_hook(noise, torch.tensor([0, 3]))(hidden)
    assert torch.equal(per_row[0, 0:2], hidden[0, 0:2] + noise[0]) and torch.equal(per_row[0, 2:], hidden[0, 2:])
    assert torch.equal(per_row[1, 3:5], hidden[1, 3:5] + noise[1]) and torch.equal(per_row[1, :3], hidden[1, :3])


def test_noised_prediction_is_the_top_token_of_the_corrupted_run():
    model = sharp("random:gptj-tiny")
    o_noise = noised_prediction(model, PROMPT, SUBJECT, samples=4, seed=2)
    traced = trace(model, PROMPT, SUBJECT, model.tokenizer.decode([o_noise.token_id]), window=3, samples=4, seed=2)
    assert traced.answer_id == o_noise.token_id
    assert abs(traced.p_noise - o_noise.p) <= 1e-6
    other = trace(model, PROMPT, SUBJECT, window=3, samples=4, seed=2)  # the clean top token
    assert other.p_noise <= o_noise.p + 1e-7


def hand_zeroed_probability(model, prompt, span, answer_id):
    """Zero every MLP output at the subject tokens with plain torch hooks on the HF modules."""
    def hook(module, args, output):
        output = output.clone()
        output[:, span[0]:span[1]] = 0
        return output

    handles = [_get(model.hf, model.adapter.mlp.format(layer)).register_forward_hook(hook)
               for layer in range(model.n_layers)]
    try:
        with torch.no_grad():
            logits = model.hf(model.encode([prompt]).input_ids).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return float(torch.softmax(logits, -1)[answer_id])


@pytest.mark.parametrize("spec", ("random:gpt2-tiny", "random:gptj-tiny", "random:llama-tiny"))
@pytest.mark.parametrize("engine", ("fast", "generic"))
def test_zeroing_every_layer_at_the_subject_equals_a_hand_built_forward(spec, engine):
    model = sharp(spec)
    L = model.n_layers
    result = zero_trace(model, PREFIXED, SUBJECT, window=L, engine=engine)
    assert window_layers(L // 2, L, L) == range(0, L)
    expected = hand_zeroed_probability(model, PREFIXED, result.subject_span, result.answer_id)
    assert abs(float(result.p_zero[L // 2]) - expected) <= 1e-6
    assert abs(expected - result.p_clean) > 2e-5  # zeroing changes p by more than the tolerance
    assert torch.allclose(result.effect, ((result.p_clean - result.p_zero) / result.p_clean).clamp(0, 1))


def test_zeroing_engines_agree_on_every_window():
    model = deep("llama")
    fast = zero_trace(model, PREFIXED, SUBJECT, window=5, engine="fast")
    generic = zero_trace(model, PREFIXED, SUBJECT, window=5, engine="generic")
    assert (fast.p_zero - generic.p_zero).abs().max() <= 1e-6


@pytest.mark.parametrize("kwargs, message", [
    (dict(subject="Big Ben"), "is not in the prompt"),
    (dict(window=0), "window must be an integer >= 1"),
    (dict(window=5), "larger than the model's 4 layers"),
    (dict(samples=0), "samples must be an integer >= 1"),
    (dict(kind="ffn"), "unknown kind"),
    (dict(noise="x3"), "unknown noise rule"),
    (dict(noise=-1.0), "must give a finite, positive scale"),
    (dict(target=""), "empty target"),
    (dict(tokens="first"), "unknown tokens"),
    (dict(tokens=[40]), "outside the prompt"),
    (dict(engine="turbo"), "unknown engine"),
])
def test_bad_input_gives_one_line_errors(kwargs, message):
    args = dict(model=sharp("random:gpt2-tiny"), prompt=PROMPT, subject=SUBJECT, window=3, samples=2)
    args.update(kwargs)
    with pytest.raises(TracekitError, match=message) as err:
        trace(**args)
    assert "\n" not in str(err.value)


def test_fast_engine_runs_other_backends_through_whole_passes():
    result = trace(sharp("random:gpt2-tiny", "nnsight"), PROMPT, SUBJECT, window=3, samples=2, engine="fast")
    assert result.config["engine"] == "fast" and result.config["forward"] == "whole passes"
    assert sharp("random:gpt2-tiny").forward_path == "blocks"


def test_equal_clean_and_noised_probabilities_give_zero_effects_with_a_warning():
    model = sharp("random:gpt2-tiny")
    with pytest.warns(UserWarning, match="p_clean == p_noise"):
        result = trace(model, PROMPT, SUBJECT, window=3, samples=2, noise=1e-30)
    assert result.p_clean == pytest.approx(result.p_noise, rel=1e-6)
    assert torch.equal(result.effect, torch.zeros_like(result.p_restore))
