"""FT-1 / FT-5: raise p(target), stay in the L-infinity ball, undo bit for bit, edit exactly their layers."""

import functools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

from tracekit import TracekitError
from tracekit.adapters import adapter_for
from tracekit.adapters.backends import HFBackend
from tracekit.editing import finetune as F
from tracekit.editing import presets
from tracekit.editing.finetune import LEGACY_FT, FTHyperParams, apply_ft, edit_window
from tracekit.editing.presets import ft_preset
from tracekit.editing.request import EditRequest
from tracekit.models import Model
from tracekit.models.random_models import offline_tokenizer

from conftest import BACKENDS, TINY_SPECS, tiny

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")
STRONG = FTHyperParams(lr=5e-2, norm_constraint=5e-2, stop_loss=None)


@functools.lru_cache(maxsize=None)
def six_layers(arch: str) -> Model:
    """A 6-layer random model of ``arch`` (the shared tiny ones have 4, too few for FT-5)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=6, n_head=4, n_positions=64, vocab_size=512))
    elif arch == "gptj":
        hf = GPTJForCausalLM(GPTJConfig(n_embd=32, n_layer=6, n_head=4, n_positions=64, rotary_dim=4, vocab_size=512))
    else:
        hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=64, max_position_embeddings=64, vocab_size=512))
    hf.eval().requires_grad_(False)
    tok = offline_tokenizer()
    return Model(f"six-layer {arch}", HFBackend(hf, adapter_for(hf), tok), tok, adapter_for(hf))


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.hf.named_parameters()}


def _p(model, request):
    return float(model.target_probs([request.text], request.target)[0])


@pytest.mark.parametrize("spec", TINY_SPECS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ft1_raises_target_stays_in_ball_and_undoes(spec, backend):
    model = tiny(spec, backend)
    before = _snapshot(model)
    p0 = _p(model, REQUEST)
    edit = apply_ft(model, REQUEST, 2, STRONG)
    assert all(torch.equal(before[n], p) for n, p in model.hf.named_parameters())  # returned un-applied
    name = F.down_proj_name(model, 2)
    has_bias = getattr(model.adapter.down_proj_module(model.hf, 2), "bias", None) is not None
    assert sorted(edit.parameter_names) == sorted([name] + ([name[: -len("weight")] + "bias"] if has_bias else []))
    assert edit.info.layers == [2]
    for changed in edit.parameter_names:  # weight and bias alike stay in the ball (the paper's code)
        delta = edit.delta(changed)
        old = before[changed]
        new = old + delta
        assert torch.all(new <= old + STRONG.norm_constraint) and torch.all(new >= old - STRONG.norm_constraint)
    assert edit.delta(name).abs().max() > 0.5 * STRONG.norm_constraint  # the ball is actually used
    with edit:
        assert _p(model, REQUEST) > 2 * p0
    assert all(torch.equal(before[n], p) for n, p in model.hf.named_parameters())


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_ft5_changes_exactly_five_layers(arch):
    model = six_layers(arch)
    before = _snapshot(model)
    p0 = _p(model, REQUEST)
    hp = FTHyperParams(n_layers=5, lr=5e-2, norm_constraint=5e-2, stop_loss=None, train_bias=False)
    edit = apply_ft(model, REQUEST, 3, hp)
    assert edit.info.layers == [1, 2, 3, 4, 5]
    with edit:
        changed = {n for n, p in model.hf.named_parameters() if not torch.equal(p, before[n])}
        assert _p(model, REQUEST) > 1.5 * p0
    expected = {F.down_proj_name(model, layer) for layer in range(1, 6)}
    assert changed == expected
    for name in expected:
        assert edit.delta(name).abs().max() <= hp.norm_constraint * (1 + 1e-6)
    assert all(torch.equal(before[n], p) for n, p in model.hf.named_parameters())


def test_window_must_fit_inside_the_model():
    model = six_layers("gpt2")
    assert edit_window(model, 2, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(TracekitError, match="spans -1..3, past this model's layers 0..5; pick a layer in 2..3"):
        edit_window(model, 1, 5)
    with pytest.raises(TracekitError, match="spans 2..6"):
        edit_window(model, 4, 5)
    with pytest.raises(TracekitError, match="out of range"):
        edit_window(model, 6, 1)
    with pytest.raises(TracekitError, match="at least 5 layers; this one has 4"):
        edit_window(tiny("random:gpt2-tiny"), 2, 5)
    assert edit_window(model, 1, 5, clip=True) == [0, 1, 2, 3]  # cut at the edges, as tracing windows
    assert edit_window(model, 5, 5, clip=True) == [3, 4, 5]


def test_ft5_at_the_first_layer_clips_its_window_when_asked():
    from tracekit.editing.api import edit

    model = six_layers("gpt2")
    hp = FTHyperParams(n_layers=5, steps=2, lr=1e-3, norm_constraint=1e-3)
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    with pytest.raises(TracekitError, match="FT-5's 5-layer window centred on layer 0 spans -2..2"):
        edit(model, request, "ft-5", layer=0, hparams=hp, evaluate=False)
    result = edit(model, request, "ft-5", layer=0, hparams=hp, evaluate=False, clip_window=True)
    assert result.layers == [0, 1, 2]


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_fact_erasure_lowers_target(spec):
    model = tiny(spec)
    request = EditRequest(REQUEST.prompt, REQUEST.subject, " Paris", minimize=True)
    p0 = _p(model, request)
    with apply_ft(model, request, 1, STRONG):
        assert _p(model, request) < 0.5 * p0


def test_loss_is_teacher_forced_over_every_target_token():
    """A 3-token target: the edit must raise the whole continuation, not only its first token."""
    model = tiny("random:llama-tiny")
    request = EditRequest(REQUEST.prompt, REQUEST.subject, " Paris Tower of")
    before = float(model.sequence_logprobs([request.text], [request.target])[0])
    edit = apply_ft(model, request, 1, STRONG)
    with edit:
        after = float(model.sequence_logprobs([request.text], [request.target])[0])
        later = model.sequence_logprobs([request.text + " Paris"], [" Tower of"])[0]
    assert after > before + 1.0
    assert edit.info.losses[0] == pytest.approx(-before, rel=1e-4)  # the NLL summed over the 3 tokens (paper code)
    legacy = apply_ft(model, request, 1, FTHyperParams(**{**STRONG.__dict__, **LEGACY_FT}))
    assert legacy.info.losses[0] == pytest.approx(-before / 3, rel=1e-4)  # tracekit 0.1: the mean
    with torch.no_grad():
        assert float(later) > float(model.sequence_logprobs([request.text + " Paris"], [" Tower of"])[0])


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_block_driven_steps_equal_whole_forward_passes(spec, monkeypatch):
    model = tiny(spec)
    noise = torch.randn(3, model.d_model) * 0.5
    request = EditRequest(REQUEST.prompt, REQUEST.subject, " Paris Tower", noise=noise)
    fast = apply_ft(model, request, 2, STRONG)
    assert fast.info.engine == "blocks"
    # the same steps through whole passes (the seam's path for TransformerLens and nnsight)
    monkeypatch.setattr(type(model.backend), "forward_path", lambda self: ("whole passes", "forced"))
    slow = apply_ft(model, request, 2, STRONG)
    assert slow.info.engine == "forward"
    for name in fast.parameter_names:  # the same sums in another order; Adam's step rescales their last bits
        assert torch.allclose(fast.delta(name), slow.delta(name), atol=1e-5)  # up to 1e-6 in 18 draws (AVX-512)
    assert fast.info.losses == pytest.approx(slow.info.losses, abs=1e-5)


def test_noise_changes_the_edit():
    model = tiny("random:gpt2-tiny")
    start, end = model.subject_span(REQUEST.text, REQUEST.subject)
    noised = EditRequest(REQUEST.prompt, REQUEST.subject, REQUEST.target, noise=torch.randn(end - start, model.d_model))
    a, b = apply_ft(model, REQUEST, 2, STRONG), apply_ft(model, noised, 2, STRONG)
    name = a.parameter_names[0]
    assert not torch.allclose(a.delta(name), b.delta(name))


def test_stop_loss_ends_early():
    model = tiny("random:gpt2-tiny")
    edit = apply_ft(model, REQUEST, 2, FTHyperParams(lr=5e-2, norm_constraint=None, steps=40, stop_loss=5.5))
    assert edit.info.steps_taken < 40 and edit.info.losses[-1] < 5.5 < edit.info.losses[0]
    assert edit.info.steps_taken == len(edit.info.losses) - 1  # no step once below; fixed inputs: nothing moves again


def test_fresh_noise_runs_ten_noised_copies_and_waits_five_passes():
    """Fact Forcing under the paper code's noise: 10 rows per pass, a new draw each pass, and the
    run ends after 5 passes in a row below stop_loss (noise can lift the loss again)."""
    from tracekit.editing.subject_noise import make_subject_noise

    model = tiny("random:gpt2-tiny")
    noise = make_subject_noise(model, REQUEST.text, REQUEST.subject, noise=0.05, convention="paper-code")
    request = EditRequest(REQUEST.prompt, REQUEST.subject, REQUEST.target, noise=noise)
    edit = apply_ft(model, request, 2, FTHyperParams(lr=5e-2, norm_constraint=None, steps=60, stop_loss=60.0))
    losses = edit.info.losses
    assert edit.info.engine == "forward" and edit.info.noise["noise_convention"] == "paper-code"
    below = [x < 60.0 for x in losses]
    assert below[-5:] == [True] * 5 and len(losses) < 60  # five in a row below, then stop
    assert losses[0] > 10 * 4  # ten rows' NLLs summed


@pytest.mark.parametrize("bad, message", [
    (dict(lr=-1e-3), "learning rate must be positive"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(norm_constraint=0.0), "norm_constraint must be positive"),
    (dict(n_layers=0), "n_layers must be >= 1"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(layer=-2), "default layer must be >= 0"),
])
def test_bad_hyperparameters(bad, message):
    with pytest.raises(TracekitError, match=message):
        FTHyperParams(**bad)


def test_presets():
    gptj = ft_preset(tiny("random:gptj-tiny"), "error-injection", 1)
    assert gptj.source.startswith("public GPT-J constrained")  # a tiny GPT-J is not GPT-J 6B
    F = presets
    assert F.FT_PRESETS["gpt-j-6b/constrained"] == FTHyperParams(steps=25, lr=5e-4, norm_constraint=5e-5, layer=21,
                                                               source=F.FT_PRESETS["gpt-j-6b/constrained"].source)
    assert F.FT_PRESETS["gpt-j-6b/error-injection/ft-1"].norm_constraint == 1e-4
    assert F.FT_PRESETS["gpt-j-6b/error-injection/ft-5"].norm_constraint == 2e-5
    assert F.FT_PRESETS["gpt-j-6b/fact-forcing/ft-5"].steps == 50
    assert F.FT_PRESETS["gpt2-xl/fact-forcing/ft-1"].norm_constraint == 5e-4
    assert ft_preset(tiny("random:gpt2-tiny"), "fact-forcing", 5).steps == 50
