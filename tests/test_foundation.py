"""Adapters, backends, loading and prompt helpers."""

import pytest
import torch

import tracekit
from tracekit import TracekitError
from tracekit.adapters import Site
from tracekit.errors import SubjectWarning
from tracekit.prompts import subject_span, target_ids

from conftest import BACKENDS, TINY_SPECS, tiny

PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of France is"]


@pytest.mark.parametrize("spec", TINY_SPECS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_plain_transformers(spec, backend):
    model = tiny(spec, backend)
    batch = model.encode(PROMPTS)
    ours = model.run(batch.input_ids).logits
    with torch.no_grad():
        reference = model.hf(batch.input_ids).logits
    assert torch.allclose(ours, reference, atol=1e-4)
    last = model.run(batch.input_ids, positions=batch.last).logits
    assert torch.allclose(last, reference[torch.arange(2), batch.last], atol=1e-4)


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_every_backend_sees_the_same_states(spec):
    sites = [Site("embed"), Site("attn", 1), Site("mlp_in", 1), Site("mlp", 1), Site("resid", 2)]
    outs = {}
    for backend in BACKENDS:
        model = tiny(spec, backend)
        outs[backend] = model.run(model.encode(PROMPTS).input_ids, capture=sites).captured
    for backend in BACKENDS[1:]:
        for site in sites:
            assert torch.allclose(outs[backend][site], outs["hf"][site], atol=1e-5), (backend, site)


@pytest.mark.parametrize("spec", TINY_SPECS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edit_hook_changes_downstream_only(spec, backend):
    model = tiny(spec, backend)
    ids = model.encode(PROMPTS).input_ids
    clean = model.run(ids, capture=[Site("resid", 0), Site("resid", 3)]).captured
    edited = model.run(ids, edits={Site("mlp", 2): torch.zeros_like}, capture=[Site("resid", 0), Site("resid", 3)]).captured
    assert torch.equal(edited[Site("resid", 0)], clean[Site("resid", 0)])
    assert not torch.allclose(edited[Site("resid", 3)], clean[Site("resid", 3)])


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_down_projection_is_the_weight_the_mlp_uses(spec):
    """Perturb the adapter's down-projection; the MLP output moves by key @ delta^T."""
    model = tiny(spec)
    layer = 1
    ids = model.encode(PROMPTS).input_ids
    sites = [Site("mlp_in", layer), Site("mlp", layer)]
    before = model.run(ids, capture=sites).captured
    weight = model.adapter.down_proj_weight(model.hf, layer)
    delta_out_in = torch.randn(model.d_model, before[Site("mlp_in", layer)].shape[-1]) * 1e-2
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(model.adapter.from_out_in(delta_out_in))
        after = model.run(ids, capture=sites).captured
    finally:
        with torch.no_grad():
            weight.copy_(original)
    predicted = before[Site("mlp", layer)] + before[Site("mlp_in", layer)] @ delta_out_in.T
    assert torch.allclose(after[Site("mlp", layer)], predicted, atol=1e-5)
    assert model.adapter.down_proj_transposed == (model.adapter.name == "gpt2")


def test_subject_span_cases():
    tok = tiny("random:gpt2-tiny").tokenizer
    prompt = "The Eiffel Tower is located in the city of"
    assert tok.convert_ids_to_tokens(tok(prompt)["input_ids"])[:3] == ["The", "ĠEiffel", "ĠTower"]
    assert subject_span(tok, prompt, "The Eiffel Tower") == (0, 3)
    assert subject_span(tok, prompt, "Eiffel Tower") == (1, 3)  # leading space lives in " Eiffel"
    with pytest.warns(SubjectWarning, match="inside the longer word 'Eiffel'"):
        assert subject_span(tok, prompt, "Eiff") == (1, 2)  # merged across the boundary
    twice = "The Tower and the Tower"
    assert tok.tokenize(twice) == ["The", "ĠTower", "Ġand", "Ġthe", "ĠTower"]
    assert subject_span(tok, twice, "Tower", occurrence=0) == (1, 2)
    assert subject_span(tok, twice, "Tower", occurrence=-1) == (4, 5)
    with pytest.raises(TracekitError, match="not in the prompt"):
        subject_span(tok, prompt, "Colosseum")


def test_target_tokens():
    tok = tiny("random:gpt2-tiny").tokenizer
    assert tok.convert_ids_to_tokens(target_ids(tok, " Paris")) == ["ĠParis"]
    assert len(target_ids(tok, " Parisienne")) > 1
    with pytest.raises(TracekitError, match="empty target"):
        target_ids(tok, "")


def test_batched_probs_match_single_prompts():
    model = tiny("random:llama-tiny")
    batched = model.target_probs(PROMPTS, [" Paris", " Rome"])
    single = torch.stack([model.target_probs([p], [t])[0] for p, t in zip(PROMPTS, [" Paris", " Rome"])])
    assert torch.allclose(batched, single, atol=1e-6)
    logp = model.sequence_logprobs(PROMPTS[:1], [" Paris"])
    assert torch.allclose(logp.exp(), batched[:1], atol=1e-5)
    assert len(model.generate(PROMPTS, max_new_tokens=3)) == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: tracekit.load_model("no-such-model"), "unknown model spec"),
        (lambda: tracekit.load_model("random:nope"), "unknown random shape"),
        (lambda: tracekit.load_model("./missing/folder"), "no such model"),
        (lambda: tracekit.load_model("gpt2-xl"), "hub"),
        (lambda: tracekit.load_model("random:gpt2-tiny", backend="jax"), "unknown backend"),
        (lambda: tiny("random:gpt2-tiny").encode([""]), "empty prompt"),
        (lambda: tiny("random:gpt2-tiny").encode(["word " * 200]), "longer than the model's context"),
        (lambda: tiny("random:gpt2-tiny").run(torch.zeros(1, 2, dtype=torch.long), capture=[Site("mlp", 9)]), "out of range"),
        (lambda: Site("mlp"), "needs a layer"),
        (lambda: Site("ffn", 1), "unknown site kind"),
    ],
)
def test_bad_input_gives_one_line_errors(call, message):
    with pytest.raises(TracekitError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_cli_models_and_errors(capsys):
    from tracekit.cli import main

    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
    assert main(["predict", "--model", "nope", "--prompt", "hi"]) == 2
    assert "unknown model spec" in capsys.readouterr().out


@pytest.mark.slow
def test_bundled_model_knows_paris(smollm):
    assert smollm.n_layers == 30 and smollm.d_model == 576
    token, p = smollm.top_tokens("The Eiffel Tower is located in the city of", k=5)[0]
    assert token == " Paris" and p > 0.3


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_greedy_generation_agrees_across_backends(spec):
    texts = {backend: tiny(spec, backend).generate(PROMPTS, max_new_tokens=6) for backend in BACKENDS}
    assert texts["transformer_lens"] == texts["hf"] == texts["nnsight"]


def test_a_prepended_document_start_shifts_spans_but_not_targets():
    from tracekit import prompts as P
    from tracekit.models.loading import prepend_token
    from tracekit.models.random_models import offline_tokenizer

    bare = offline_tokenizer()
    tok = prepend_token(bare, "<|endoftext|>")
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    assert P.token_ids(tok, prompt) == [bare.eos_token_id] + P.token_ids(bare, prompt)
    start, end = P.subject_span(bare, prompt, subject)
    assert P.subject_span(tok, prompt, subject) == (start + 1, end + 1)
    assert P.target_ids(tok, " Paris") == P.target_ids(bare, " Paris")
    assert P.token_ids(bare, prompt)[0] != bare.eos_token_id  # the copy leaves the original alone
    with pytest.raises(TracekitError, match="cannot prepend '<nope>'"):
        prepend_token(bare, "<nope>")
