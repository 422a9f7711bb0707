"""ROME and MEMIT on tiny random GPT-2, GPT-J and Llama models (and a 6-layer Llama for
MEMIT's 5-layer window); the bundled model's Danielle Darrieux edit is marked slow."""

import dataclasses

import pytest
import torch

from conftest import TINY_SPECS, tiny
from tracekit.editing.hparams import LEGACY, MEMITHyperParams, ROMEHyperParams
from tracekit.editing.presets import memit_preset, rome_preset
from tracekit.editing.kv_core import build_rows, weights_by_tokenisation
from tracekit.editing.memit import apply_memit
from tracekit.editing.request import EditRequest
from tracekit.editing.rome import apply_rome
from tracekit.errors import TracekitError

CORPUS = ("The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.\n"
          "Steve Jobs was the founder of Apple. Microsoft was founded by Bill Gates.\n\n"
          "The capital of Japan is Tokyo. Michael Jordan plays basketball.\n\n") * 60
# The subject ends the prompt: in a random model, attention carries little from an earlier
# subject token to the last position, so only there does an edit move p(target) clearly.
# (The core tests cover subjects inside the prompt.)
REQUEST = EditRequest("We visited {}", "The Eiffel Tower", " Rome")
# Random models: MLP outputs are tiny, so the public clamp and weight decay (relative to
# |MLP output|) would pin the delta near zero; statistics from a few thousand tokens.
SMALL = dict(mom2_n_samples=40, mom2_sample_tokens=32, mom2_ridge=1e-2, context_lengths=((3, 2), (5, 2)),
             v_num_grad_steps=12, v_weight_decay=0.0, clamp_norm_factor=1e3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return str(path)


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _cache(request, monkeypatch, _module_cache):
    """Tiny-model tests share a throw-away cache; the bundled model keeps the user's own."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("TRACEKIT_CACHE", _module_cache)


def rome_hp(corpus, **kw):
    return ROMEHyperParams(corpus=corpus, **{**SMALL, **kw})


def memit_hp(corpus, **kw):
    return MEMITHyperParams(corpus=corpus, mom2_update_weight=1.0, **{**SMALL, **kw})


def six_layer_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tracekit.adapters import adapter_for, make_backend
    from tracekit.models.model import Model
    from tracekit.models.random_models import offline_tokenizer

    config = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = LlamaForCausalLM(config).eval()
    hf.requires_grad_(False)
    tok, adapter = offline_tokenizer(), adapter_for(hf)
    return Model("test:llama-6", make_backend("hf", hf, adapter, tok, None), tok, adapter)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.hf.named_parameters()}


def p_target(model, request=REQUEST):
    return float(model.target_probs([request.text], request.target)[0])


# ---- what every edit must do ----------------------------------------------------------------------
@pytest.mark.parametrize("spec", TINY_SPECS)
def test_rome_raises_p_target_with_a_rank_one_change(spec, corpus):
    model = tiny(spec)
    before, weights = p_target(model), snapshot(model)
    edit = apply_rome(model, REQUEST, 2, rome_hp(corpus), progress=False)
    assert all(torch.equal(p, weights[n]) for n, p in model.hf.named_parameters())  # not applied yet
    with edit:
        after = p_target(model)
    assert after > 1.5 * before
    (name,) = edit.parameter_names
    change = model.adapter.as_out_in(edit.delta(name)).double()
    singular = torch.linalg.svdvals(change)
    assert singular[1] < 1e-5 * singular[0]  # rank one
    # the public code's update: the bare prompt's own key k_p goes exactly onto v*
    details = edit.info.details
    (k_p,), (residual,) = details["keys"], details["residuals"]
    torch.testing.assert_close(change.float() @ k_p, residual, rtol=1e-3, atol=1e-4)
    assert edit.info.final_nll < details["loss_trace"][0]["nll"]
    assert edit.info.steps_taken == len(details["loss_trace"]) - 1  # the last pass only evaluates


def test_rome_paper_equation_maps_the_mean_key_onto_v_star(corpus):
    model = tiny("random:gpt2-tiny")
    edit = apply_rome(model, REQUEST, 2, rome_hp(corpus, **LEGACY["rome"]), progress=False)
    (name,) = edit.parameter_names
    change = model.adapter.as_out_in(edit.delta(name)).float()
    # W' k* = W k* + delta (with v* based on the templates' mean MLP output)
    torch.testing.assert_close(change @ edit.info.details["key"], edit.info.details["delta"], rtol=1e-3, atol=1e-4)
    assert edit.info.steps_taken == len(edit.info.losses)  # tracekit 0.1 stepped after every pass


def test_rome_value_is_sized_on_the_bare_prompt(corpus):
    """Clamp radius and weight decay use the MLP output at row 0 (the bare prompt), not the mean."""
    model = tiny("random:gpt2-tiny")
    templates = ["{}", "The capital of Japan is Tokyo. {}", "I went there. {}"]
    first = apply_rome(model, REQUEST, 2, rome_hp(corpus, clamp_norm_factor=0.5), templates=templates, progress=False)
    mean = apply_rome(model, REQUEST, 2, rome_hp(corpus, clamp_norm_factor=0.5, value_reference="mean"),
                      templates=templates, progress=False)
    from tracekit.adapters import Site
    from tracekit.editing.kv_core import subject_states

    rows = build_rows(model, REQUEST, templates, None)
    out = subject_states(model, rows, [Site("mlp", 2)])[Site("mlp", 2)]
    assert first.info.details["value_norm"] == pytest.approx(float(out[0].norm()), rel=1e-5)
    assert mean.info.details["value_norm"] == pytest.approx(float(out.mean(0).norm()), rel=1e-5)
    # the clamp binds in both, at different radii
    assert first.info.details["delta_norm"] == pytest.approx(0.5 * float(out[0].norm()), rel=1e-4)
    assert mean.info.details["delta_norm"] == pytest.approx(0.5 * float(out.mean(0).norm()), rel=1e-4)


# "Paris" opening a prompt is Par|is in the offline tokenizer; after a space it is one token.
SUBJECT_FIRST = EditRequest("{} is the capital of", "Paris", " Rome")
TWO_FORMS = ["{}", "I went there. {}", "We saw it. {}"]


def test_key_per_tokenisation_maps_each_subject_form_onto_v_star(corpus):
    model = tiny("random:gpt2-tiny")
    rows = build_rows(model, SUBJECT_FIRST, TWO_FORMS, None)
    assert len(set(rows.subject_tokens)) == 2 and rows.subject_tokens[1] == rows.subject_tokens[2]
    assert weights_by_tokenisation(rows).tolist() == [0.5, 0.25, 0.25]  # each form weighs half in v*'s NLL
    edit = apply_rome(model, SUBJECT_FIRST, 2, rome_hp(corpus, key_per_tokenisation=True), templates=TWO_FORMS,
                      progress=False)
    (name,) = edit.parameter_names
    change = model.adapter.as_out_in(edit.delta(name)).double()
    singular = torch.linalg.svdvals(change)
    assert singular[1] > 1e-3 * singular[0] and singular[2] < 1e-6 * singular[0]  # rank two: one per form
    keys, residuals = edit.info.details["keys"], edit.info.details["residuals"]
    assert keys.shape[0] == 2
    torch.testing.assert_close(change.float() @ keys.T, residuals.T, rtol=1e-3, atol=1e-4)  # W' k_g = v*


def test_key_per_tokenisation_is_rome_when_the_subject_tokenises_one_way(corpus):
    model = tiny("random:gpt2-tiny")
    templates = TWO_FORMS[1:]  # the subject follows a space in both: one group, whose mean key is k*
    plain = apply_rome(model, SUBJECT_FIRST, 2, rome_hp(corpus, update_key="mean"), templates=templates, progress=False)
    grouped = apply_rome(model, SUBJECT_FIRST, 2, rome_hp(corpus, key_per_tokenisation=True), templates=templates,
                         progress=False)
    (name,) = plain.parameter_names
    torch.testing.assert_close(grouped.delta(name), plain.delta(name), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["rome", "memit"])
@pytest.mark.parametrize("spec", TINY_SPECS)
def test_undo_restores_every_parameter_bit_for_bit(spec, method, corpus):
    model = tiny(spec)
    weights = snapshot(model)
    edit = (apply_rome(model, REQUEST, 1, rome_hp(corpus), progress=False) if method == "rome" else
            apply_memit(model, REQUEST, 2, memit_hp(corpus, window=3), progress=False))
    edit.apply()
    assert any(not torch.equal(p, weights[n]) for n, p in model.hf.named_parameters())
    edit.undo()
    assert all(torch.equal(p, weights[n]) for n, p in model.hf.named_parameters())


def test_memit_changes_exactly_its_five_layers_and_raises_p_target(corpus):
    model = six_layer_llama()
    before = p_target(model)
    edit = apply_memit(model, REQUEST, 3, memit_hp(corpus), progress=False)
    assert edit.info.layers == [1, 2, 3, 4, 5] and edit.info.details["z_layer"] == 5
    assert sorted(edit.parameter_names) == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(1, 6)]
    assert all(edit.delta(n).abs().max() > 0 for n in edit.parameter_names)
    with edit:
        assert p_target(model) > 1.5 * before
    # each layer takes its share of what is left: 1/5, 1/4, ... of the remaining residual
    shares = edit.info.details["per_layer"]
    assert shares[-1]["share_norm"] == pytest.approx(shares[-1]["residual_norm"])
    assert shares[0]["share_norm"] == pytest.approx(shares[0]["residual_norm"] / 5)


def _as_memit(rome: ROMEHyperParams, **kw) -> MEMITHyperParams:
    shared = {f.name for f in dataclasses.fields(MEMITHyperParams)}
    fields = {f.name: getattr(rome, f.name) for f in dataclasses.fields(ROMEHyperParams) if f.name in shared}
    return MEMITHyperParams(**{**fields, "window": 1, "mom2_update_weight": 0.0, "clamp_to": "mlp", **kw})


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_memit_with_one_layer_reduces_to_rome(spec, corpus):
    """One layer, lambda = 0, the delta clamped relative to the MLP output, uniform keys and
    values from the templates' mean: ROME's equation form exactly."""
    model = tiny(spec)
    rome_legacy = rome_hp(corpus, clamp_norm_factor=0.5, **LEGACY["rome"])
    rome = apply_rome(model, REQUEST, 2, rome_legacy, progress=False)
    memit = apply_memit(model, REQUEST, 2, _as_memit(rome_legacy, **LEGACY["memit"]), progress=False)
    assert rome.parameter_names == memit.parameter_names and memit.info.layers == [2]
    assert rome.info.details["delta_norm"] == pytest.approx(0.5 * rome.info.details["value_norm"], rel=1e-4)  # clamped
    (name,) = rome.parameter_names
    torch.testing.assert_close(memit.delta(name), rome.delta(name), rtol=1e-4, atol=1e-6)


def test_memit_with_one_layer_and_one_template_is_the_public_rome(corpus):
    """With the bare prompt alone k* = k_p: the public ROME and MEMIT updates coincide."""
    model = tiny("random:gpt2-tiny")
    hp = rome_hp(corpus, clamp_norm_factor=0.5)
    rome = apply_rome(model, REQUEST, 2, hp, templates=["{}"], progress=False)
    memit = apply_memit(model, REQUEST, 2, _as_memit(hp), templates=["{}"], progress=False)
    (name,) = rome.parameter_names
    torch.testing.assert_close(memit.delta(name), rome.delta(name), rtol=1e-4, atol=1e-6)


def test_memit_keys_average_each_context_type_first(corpus):
    from tracekit.editing.kv_core import average_keys

    keys = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    assert float(average_keys(keys, (1, 3), "per-context-type")) == pytest.approx((1 + 5) / 2)
    assert float(average_keys(keys, (1, 3), "uniform")) == pytest.approx(4.0)


def test_same_rome_edit_under_every_backend(corpus):
    templates = ["{}", "The capital of Japan is Tokyo. {}"]
    edits = {}
    for backend in ("hf", "transformer_lens", "nnsight"):
        model = tiny("random:gpt2-tiny", backend)
        edits[backend] = apply_rome(model, REQUEST, 2, rome_hp(corpus), templates=templates, progress=False)
        # the seam decides: blocks driven on the hf backend, whole passes under TransformerLens and nnsight
        assert edits[backend].info.engine == ("blocks" if backend == "hf" else "hooks")
    reference = edits["hf"].delta(edits["hf"].parameter_names[0])
    for backend in ("transformer_lens", "nnsight"):
        delta = edits[backend].delta(edits[backend].parameter_names[0])
        torch.testing.assert_close(delta, reference, rtol=1e-3, atol=1e-5)
    model = tiny("random:gpt2-tiny", "transformer_lens")
    before = p_target(model)
    with edits["transformer_lens"]:
        assert p_target(model) > before  # the bridge sees the edited weight


# ---- editing problems ------------------------------------------------------------------------
def test_fact_erasure_lowers_p_target(corpus):
    model = tiny("random:llama-tiny")
    request = EditRequest(REQUEST.prompt, REQUEST.subject, " Paris", minimize=True)
    before = p_target(model, request)
    with apply_rome(model, request, 2, rome_hp(corpus), progress=False):
        assert p_target(model, request) < 0.7 * before


def test_fact_forcing_edits_under_the_subject_noise(corpus):
    model = tiny("random:gptj-tiny")
    start, end = model.subject_span(REQUEST.text, REQUEST.subject)
    noise = 0.5 * torch.randn(end - start, model.d_model, generator=torch.Generator().manual_seed(3))
    noised = EditRequest(REQUEST.prompt, REQUEST.subject, REQUEST.target, noise=noise)
    plain_edit = apply_rome(model, REQUEST, 2, rome_hp(corpus), progress=False)
    noised_edit = apply_rome(model, noised, 2, rome_hp(corpus), progress=False)
    assert not torch.allclose(noised_edit.info.details["key"], plain_edit.info.details["key"])  # keys on the noised subject
    from tracekit.editing.kv_core import ValueObjective, build_rows

    rows = build_rows(model, noised, ["{}"], None)
    before = float(ValueObjective(model, rows, 3)(torch.zeros(model.d_model))[0])
    with noised_edit:
        after = float(ValueObjective(model, rows, 3)(torch.zeros(model.d_model))[0])
    assert after < before  # NLL of the target under the noise went down


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_layers_are_one_line_errors(corpus):
    model = tiny("random:gpt2-tiny")
    with pytest.raises(TracekitError, match="layer 4 is out of range"):
        apply_rome(model, REQUEST, 4, rome_hp(corpus))
    with pytest.raises(TracekitError, match=r"3-layer window centred on layer 3 spans 2..4, past this model's layers 0..3"):
        apply_memit(model, REQUEST, 3, memit_hp(corpus, window=3))
    with pytest.raises(TracekitError, match="spans -1..1"):
        apply_memit(model, REQUEST, 0, memit_hp(corpus, window=3))
    with pytest.raises(TracekitError, match="a 5-layer window needs a model with at least 5 layers; this one has 4"):
        apply_memit(model, REQUEST, 2, memit_hp(corpus))
    with pytest.raises(TracekitError, match="ROME needs ROMEHyperParams"):
        apply_rome(model, REQUEST, 1, memit_hp(corpus))
    with pytest.raises(TracekitError, match="corpus file .* does not exist"):
        apply_rome(model, REQUEST, 1, rome_hp("/no/such/corpus.txt"))


def test_memit_window_may_be_clipped(corpus):
    model = tiny("random:gpt2-tiny")
    edit = apply_memit(model, REQUEST, 3, memit_hp(corpus, clip_window=True), progress=False)
    assert edit.info.layers == [1, 2, 3]


def test_stats_file_from_another_model_fails_the_edit(corpus):
    from tracekit.editing.covariance import second_moments

    gpt2 = second_moments(tiny("random:gpt2-tiny"), [1], n_samples=40, sample_tokens=32, corpus=corpus, progress=False)[1]
    with pytest.raises(TracekitError, match="another model"):
        apply_rome(tiny("random:gptj-tiny"), REQUEST, 1, rome_hp(corpus, stats_file=str(gpt2.path)))


def test_presets():
    assert rome_preset("gpt-j-6b").layer == 5 and rome_preset("gpt2-xl").layer == 17
    assert rome_preset("gpt-j-6b", "error-injection").kl_factor == 1.0
    assert rome_preset("gpt-j-6b", "fact-forcing").v_num_grad_steps == 25
    assert rome_preset("gpt-j-6b", "fact-forcing").v_lr == 5e-2  # the paper's get_override_hparams
    assert rome_preset("gpt-j-6b", "fact-erasure") == rome_preset("gpt-j-6b")
    memit = memit_preset("gpt-j-6b", "error-injection")
    assert (memit.kl_factor, memit.mom2_update_weight, memit.clamp_norm_factor, memit.v_num_grad_steps) == (0.9, 15000.0, 0.75, 25)
    assert memit_preset("gpt2-xl").mom2_update_weight == 20000.0
    assert rome_preset(tiny("random:gpt2-tiny")).source.endswith("(unknown model)")
    # presets follow the spec, never the shape: a random model shaped like GPT2-XL is generic
    assert rome_preset("random:gpt2-xl") == rome_preset("generic")
    assert rome_preset("EleutherAI/gpt-j-6B") == rome_preset("gpt-j-6b")
    assert rome_preset("/models/gpt2-xl/") == rome_preset("gpt2-xl")
    with pytest.raises(TracekitError, match="no ROME preset 'nope'"):
        rome_preset("nope")


# ---- the bundled model ---------------------------------------------------------------------------
DARRIEUX = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
PARAPHRASES = ["Danielle Darrieux, a native speaker of", "Danielle Darrieux's mother tongue is",
               "The native language of Danielle Darrieux is"]
NEIGHBOURS = ["The mother tongue of Jean Marais is", "The mother tongue of Léon Blum is",
              "The native language of Montesquieu is", "Michel Rocard is a native speaker of",
              "The mother tongue of François Bayrou is"]


def scores(model, edit):
    """Rewrite, paraphrase (first token of " English") and neighbourhood (" French") scores."""
    prompts = [DARRIEUX.text, *PARAPHRASES, *NEIGHBOURS]
    targets = [" English"] * (1 + len(PARAPHRASES)) + [" French"] * len(NEIGHBOURS)
    before = model.target_probs(prompts, targets)
    with edit:
        after = model.target_probs(prompts, targets)
    lift = (after - before) / (1 - before)
    k = 1 + len(PARAPHRASES)
    drift = 1 - (after[k:] - before[k:]).abs() / (0.5 + (before[k:] - 0.5).abs())
    return float(lift[0]), float(lift[1:k].mean()), float(drift.mean())


@pytest.mark.slow
def test_rome_on_the_bundled_model_at_the_preset_layer(smollm):
    # 64 instead of the preset's 256 statistics samples: on a fresh machine the corpus is
    # sampled from the model first, and 64 keep that to about a minute (scores move < 0.01).
    hparams = dataclasses.replace(rome_preset(smollm), mom2_n_samples=64)
    assert hparams.layer == 3
    edit = apply_rome(smollm, DARRIEUX, None, hparams)
    rewrite, paraphrase, neighbourhood = scores(smollm, edit)
    print(f"ROME layer {hparams.layer}: rewrite {rewrite:.3f} paraphrase {paraphrase:.3f} "
          f"neighbourhood {neighbourhood:.3f}; {edit.info.seconds}")
    assert rewrite >= 0.9 and paraphrase >= 0.5 and neighbourhood >= 0.8


def test_a_sweep_warms_every_layers_statistics_in_one_pass(corpus, monkeypatch, tmp_path):
    from tracekit.editing import covariance
    from tracekit.editing.api import warm_key_statistics

    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path))  # nothing cached by the other tests
    model = six_layer_llama()
    passes = []
    accumulate = covariance.accumulate
    monkeypatch.setattr(covariance, "accumulate", lambda m, layers, *a, **k: passes.append(list(layers)) or accumulate(m, layers, *a, **k))
    rome, memit = rome_hp(corpus), memit_hp(corpus, window=3, clip_window=True)
    assert warm_key_statistics(model, ["rome"], [1, 4], rome, progress=False) == [1, 4]
    assert passes == [[1, 4]]
    assert warm_key_statistics(model, ["memit"], [0], memit, progress=False) == [0, 1]  # window 3 clipped at 0
    assert passes == [[1, 4], [0]]  # layer 1 was cached by the first call
    apply_rome(model, REQUEST, 4, rome, progress=False)
    assert passes == [[1, 4], [0]]  # the edit reads the warmed statistics
