"""Your own model: from_hf, from_transformer_lens and from_nnsight land on the same Model, over the
very modules passed in; load_model given a model object names the call to use."""

import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

import tracekit
from tracekit import TracekitError
from tracekit.models import Model
from tracekit.models.random_models import offline_tokenizer
from tracing_models import PROMPT, SUBJECT, one_thread  # noqa: F401

TOL = 1e-5


def own_gpt2(seed=5):
    """A user's model: built here, not by tracekit; peaked outputs so trace differences would show."""
    config = GPT2Config(vocab_size=512, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel(config)
    with torch.no_grad():
        hf.transformer.ln_f.weight.mul_(12.0)
    return hf


def bridge_over(hf, tokenizer, folder):
    """A bridge booted as a user would offline: config and tokenizer from a folder, weights given."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    hf.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(str(folder), hf_model=hf,
                                                   tokenizer=AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    import nnsight

    hf, tok = own_gpt2(), offline_tokenizer()
    lm = nnsight.LanguageModel(hf, tokenizer=tok)
    bridge = bridge_over(hf, tok, tmp_path_factory.mktemp("b"))
    return (tracekit.from_hf(hf, tok), tracekit.from_transformer_lens(bridge, tok), tracekit.from_nnsight(lm)), hf, lm


def test_all_three_land_on_one_model_over_the_given_modules(three):
    models, hf, lm = three
    assert [m.backend.name for m in models] == ["hf", "transformer_lens", "nnsight"]
    for model in models:
        assert isinstance(model, Model) and model.hf is hf and model.adapter.name == "gpt2"
        assert model.n_layers == 3 and not any(p.requires_grad for p in hf.parameters())
    assert models[2].wrapper is lm
    assert models[0].spec == "hf:gpt2" and tracekit.from_hf(hf, offline_tokenizer(), name="mine").spec == "mine"
    assert tracekit.from_hf(hf, offline_tokenizer(), backend="nnsight").backend.name == "nnsight"  # same modules


def test_traces_agree_across_the_three_wrappers(three):
    models, _, _ = three
    results = [tracekit.trace(m, PROMPT, SUBJECT, window=2, samples=2, seed=1, noise=0.3) for m in models]
    first = results[0]
    assert first.p_restore.max() - first.p_restore.min() > 30 * TOL  # the check can fail
    for other in results[1:]:
        assert abs(other.p_clean - first.p_clean) <= TOL and abs(other.p_noise - first.p_noise) <= TOL
        assert (other.p_restore - first.p_restore).abs().max() <= TOL


def test_an_edit_changes_your_model_and_undo_restores_it(three, tmp_path, monkeypatch):
    from tracekit.editing.hparams import ROMEHyperParams
    from tracekit.editing.request import EditRequest
    from tracekit.editing.rome import apply_rome

    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text("The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.\n" * 80)
    models, hf, _ = three
    model = models[0]
    request = EditRequest("We visited {}", "The Eiffel Tower", " Rome")
    weights = {n: p.clone() for n, p in hf.named_parameters()}
    before = float(model.target_probs([request.text], request.target)[0])
    hp = ROMEHyperParams(corpus=str(tmp_path / "corpus.txt"), mom2_n_samples=20, mom2_sample_tokens=32, mom2_ridge=1e-2,
                         context_lengths=((3, 2),), v_num_grad_steps=10, v_weight_decay=0.0, clamp_norm_factor=1e3)
    edit = apply_rome(model, request, 1, hp, progress=False)
    with edit:
        assert float(models[2].target_probs([request.text], request.target)[0]) > 1.5 * before  # seen through nnsight
    assert all(torch.equal(p, weights[n]) for n, p in hf.named_parameters())


def test_load_model_given_a_model_names_the_call(three):
    models, hf, lm = three
    with pytest.raises(TracekitError, match=r"use tracekit\.from_hf\(model, tokenizer\)$"):
        tracekit.load_model(hf)
    with pytest.raises(TracekitError, match=r"use tracekit\.from_transformer_lens\(bridge\)$"):
        tracekit.load_model(models[1].wrapper)
    with pytest.raises(TracekitError, match=r"use tracekit\.from_nnsight\(lm\)$"):
        tracekit.load_model(lm)
    with pytest.raises(TracekitError, match="takes a spec string"):
        tracekit.load_model(3)


def test_bad_input_is_a_one_line_error(three, tmp_path):
    models, hf, _ = three
    tok = offline_tokenizer()
    cases = [
        (lambda: tracekit.from_hf(GPT2Model(hf.config), tok), "causal LM with its head"),
        (lambda: tracekit.from_hf(hf, None), "tokenizer is needed"),
        (lambda: tracekit.from_hf("gpt2", tok), "takes a transformers model"),
        (lambda: tracekit.from_hf(hf, tok, backend="jax"), "unknown backend"),
        (lambda: tracekit.from_transformer_lens(hf), "takes a TransformerLens 4 TransformerBridge"),
        (lambda: tracekit.from_nnsight(hf), "takes an nnsight LanguageModel"),
    ]
    for call, message in cases:
        with pytest.raises(TracekitError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_an_unknown_architecture_lists_the_supported_ones():
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=512, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(TracekitError, match="no tracekit adapter for model_type 'bloom'; supported: gpt2"):
        tracekit.from_hf(bloom, offline_tokenizer())


def test_a_processed_bridge_is_refused(tmp_path):
    hf, tok = own_gpt2(seed=6), offline_tokenizer()
    bridge = bridge_over(hf, tok, tmp_path)
    bridge.compatibility_mode = True  # what enable_compatibility_mode() sets
    with pytest.raises(TracekitError, match="weights are processed"):
        tracekit.from_transformer_lens(bridge)


def test_your_tokenizer_is_left_as_it_was():
    tok = offline_tokenizer()
    import copy

    mine = copy.deepcopy(tok)
    mine.pad_token = None
    model = tracekit.from_hf(own_gpt2(seed=7), mine)
    assert mine.pad_token_id is None and model.tokenizer.pad_token_id == mine.eos_token_id


def test_a_bridge_encodes_with_its_own_tokenizer_by_default(three):
    models, _, _ = three
    own = tracekit.from_transformer_lens(models[1].wrapper)
    assert own.encode(["The Eiffel"]).input_ids[0].tolist()[0] == 0  # TransformerLens's BOS first
    assert models[1].encode(["The Eiffel"]).input_ids[0].tolist()[0] != 0  # the HF tokenizer given
    assert own.subject_span("The Eiffel Tower is", "The Eiffel Tower") == (1, 4)
