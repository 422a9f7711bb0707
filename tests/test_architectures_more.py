"""GPT-NeoX/Pythia, Gemma and Phi on tiny random configs: the adapter's sites exist, the batched
tracer equals the naive loop (<= 1e-5) on every backend, zeroing equals a hand-built forward, and a
ROME edit raises its target while undo restores every weight bit for bit."""

import pytest
import torch

import tracekit
from tracekit.adapters import Site
from tracekit.adapters.architectures import _get
from tracekit.editing.hparams import ROMEHyperParams
from tracekit.editing.request import EditRequest
from tracekit.editing.rome import apply_rome
from tracekit.tracing import naive_trace, trace, zero_trace
from test_tracing_semantics import hand_zeroed_probability
from tracing_models import PROMPT, SUBJECT, SHARPNESS, one_thread  # noqa: F401

SPECS = {"random:pythia-tiny": "gpt_neox", "random:gemma-tiny": "gemma", "random:phi-tiny": "phi"}
TOL = 1e-5
_models: dict = {}
_naive: dict = {}


def sharp(spec, backend="hf"):
    """Peaked outputs (see tracing_models): Gemma's RMSNorm multiplies by (1 + weight), weight 0 at init."""
    if (spec, backend) not in _models:
        model = tracekit.load_model(spec, backend=backend, device="cpu")
        norm = _get(model.hf, model.adapter.final_norm)
        with torch.no_grad():
            if model.adapter.name == "gemma":
                norm.weight.fill_(SHARPNESS - 1)
            else:
                norm.weight.mul_(SHARPNESS)
                norm.bias.mul_(SHARPNESS)
        _models[spec, backend] = model
    return _models[spec, backend]


def reference(spec, kind):
    if (spec, kind) not in _naive:
        _naive[spec, kind] = naive_trace(sharp(spec), PROMPT, SUBJECT, kind=kind, window=3, samples=2, seed=3)
    return _naive[spec, kind]


def assert_same(result, ref):
    assert result.answer_id == ref.answer_id
    assert abs(result.p_clean - ref.p_clean) <= TOL and abs(result.p_noise - ref.p_noise) <= TOL
    assert (result.p_restore - ref.p_restore).abs().max() <= TOL
    assert ref.p_restore.max() - ref.p_restore.min() > 30 * TOL  # the check can fail


@pytest.mark.parametrize("spec", SPECS)
def test_adapter_is_picked_and_every_site_is_a_module(spec):
    model = sharp(spec)
    assert model.adapter.name == SPECS[spec] and model.n_layers == 4 and model.d_model == 64
    for kind in ("resid_pre", "resid", "mlp", "attn", "mlp_in"):
        assert isinstance(model.adapter.module(model.hf, Site(kind, 3)), torch.nn.Module)
    weight = model.adapter.as_out_in(model.adapter.down_proj_weight(model.hf, 1))
    assert weight.shape[0] == model.d_model and weight.shape[1] > model.d_model  # (d_model, d_mlp)
    assert model.forward_path == "blocks"  # the fast engine drives the blocks (prefix reuse)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("kind", ("mlp", "attn", "resid"))
@pytest.mark.parametrize("engine, shapes", [("fast", "exact"), ("fast", "bucketed"), ("generic", None)])
def test_batched_tracer_equals_the_naive_loop(spec, kind, engine, shapes):
    result = trace(sharp(spec), PROMPT, SUBJECT, kind=kind, window=3, samples=2, seed=3, engine=engine, shapes=shapes)
    assert_same(result, reference(spec, kind))


@pytest.mark.parametrize("backend", ("transformer_lens", "nnsight"))
@pytest.mark.parametrize("spec", SPECS)
def test_other_backends_equal_the_naive_loop(backend, spec):
    for kind in ("mlp", "attn"):
        assert_same(trace(sharp(spec, backend), PROMPT, SUBJECT, kind=kind, window=3, samples=2, seed=3),
                    reference(spec, kind))


@pytest.mark.parametrize("spec", SPECS)
def test_zeroing_every_layer_equals_a_hand_built_forward(spec):
    model = sharp(spec)
    result = zero_trace(model, PROMPT, SUBJECT, window=4)
    assert model.n_layers == 4  # so the hand-built forward's every-layer zeroing is the window's
    expected = hand_zeroed_probability(model, PROMPT, result.subject_span, result.answer_id)
    assert abs(float(result.p_zero[2]) - expected) <= 1e-6  # window 4 at layer 2 covers layers 0..3
    assert abs(expected - result.p_clean) > 2e-5


@pytest.mark.parametrize("spec", SPECS)
def test_rome_raises_the_target_and_undo_restores_bit_for_bit(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.\n"
                      "Steve Jobs was the founder of Apple. The capital of Japan is Tokyo.\n\n" * 40)
    model = tracekit.load_model(spec, device="cpu")  # unsharpened, its own copy
    request = EditRequest("We visited {}", "The Eiffel Tower", " Rome")
    weights = {n: p.clone() for n, p in model.hf.named_parameters()}
    before = float(model.target_probs([request.text], request.target)[0])
    hp = ROMEHyperParams(corpus=str(corpus), mom2_n_samples=40, mom2_sample_tokens=32, mom2_ridge=1e-2,
                         context_lengths=((3, 2), (5, 2)), v_num_grad_steps=12, v_weight_decay=0.0,
                         clamp_norm_factor=1e3)
    edit = apply_rome(model, request, 1, hp, progress=False)
    (name,) = edit.parameter_names
    assert name == model.adapter.path(Site("mlp_in", 1)) + ".weight"
    edit.apply()
    after = float(model.target_probs([request.text], request.target)[0])
    edit.undo()
    assert after > 1.5 * before, (before, after)
    assert all(torch.equal(p, weights[n]) for n, p in model.hf.named_parameters())


@pytest.mark.parametrize("spec", SPECS)
def test_every_site_equals_the_bridge_hook_on_every_backend(spec):
    """As tests/test_sites.py for the other architectures: each mapped site (per-head q/k/v/z and the
    attention pattern included) holds the value the TransformerLens bridge reports at its hook."""
    from test_sites import assert_sites_equal_the_bridge, sites_of

    sites = sites_of(sharp(spec))
    assert {s.kind for s in sites} >= {"q", "k", "v", "z", "pattern", "resid_pre", "mlp_in"}
    assert (Site("resid_mid", 0) in sites) == (SPECS[spec] == "gemma")  # NeoX (Pythia) and Phi are parallel
    assert_sites_equal_the_bridge(lambda backend: sharp(spec, backend), sites)


def test_the_unembedding_of_another_transformers_version_is_found():
    """GPT-NeoX's head is `lm_head` in transformers 5 and `embed_out` before: the model says which."""
    from torch import nn

    from tracekit.adapters.architectures import GPT_NEOX

    class OlderNeoX(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_out = nn.Linear(4, 8, bias=False)

        def get_output_embeddings(self):
            return self.embed_out

    model = OlderNeoX()
    assert GPT_NEOX.unembed_module(model) is model.embed_out
