"""Attribution patching: exact where the metric is linear in the site, the same on every backend."""

import pytest
import torch

import tracekit
from tracekit import Noise
from tracing_models import PROMPT, SUBJECT, one_thread, sharp  # noqa: F401

CORRUPT = "The Space Needle is located in the city of"


def linear_toy():
    """gpt2-tiny with its final LayerNorm replaced by a fixed scaling: the logits, hence a logit
    difference, are linear in the last block's down-projection input, its MLP output and its output."""
    model = tracekit.load_model("random:gpt2-tiny", device="cpu")
    model.hf.transformer.ln_f = Scale()
    return model


class Scale(torch.nn.Module):
    def forward(self, x):
        return 100.0 * x


@pytest.mark.parametrize("direction", ("denoise", "noise"))
def test_attribution_equals_exact_patching_where_the_metric_is_linear(direction):
    model = linear_toy()
    last = model.n_layers - 1
    kwargs = dict(sites=["mlp_in", "mlp_out", "resid_post"], metric="logit_diff", target=" Paris", foil=" Seattle",
                  direction=direction)
    exact = tracekit.patch(model, PROMPT, CORRUPT, layers=[last], **kwargs)
    estimate = tracekit.attribution_patch(model, PROMPT, CORRUPT, **kwargs)
    at_last = [i for i, p in enumerate(estimate.patches) if p.layer == last]
    assert [estimate.patches[i] for i in at_last] == exact.patches
    got, want = estimate.values[at_last], exact.values
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
    unpatched = exact.m_corrupt if direction == "denoise" else exact.m_clean
    assert float((want - unpatched).abs().max()) > 1e-2  # the patches matter


@pytest.mark.parametrize("backend", ("transformer_lens", "nnsight"))
def test_attribution_is_the_same_on_every_backend(backend):
    kwargs = dict(sites=["resid_pre", "z", "v"], metric="prob")
    want = tracekit.attribution_patch(sharp("random:llama-tiny"), PROMPT, Noise(SUBJECT, samples=2), **kwargs)
    got = tracekit.attribution_patch(sharp("random:llama-tiny", backend), PROMPT, Noise(SUBJECT, samples=2), **kwargs)
    assert got.per_sample.shape == want.per_sample.shape == (4 * 9 * (1 + 4 + 2), 2)
    assert float((got.per_sample - want.per_sample).abs().max()) <= 1e-5


@pytest.mark.parametrize("spec", ("random:gpt2-tiny", "random:gptj-tiny", "random:llama-tiny"))
def test_the_logit_lens_ends_at_the_model_own_prediction(spec):
    model = sharp(spec)
    lens = tracekit.logit_lens(model, PROMPT, target=" Paris", k=3, positions="all")
    assert lens.layers[0] == "embed" and len(lens.layers) == model.n_layers + 1
    assert lens.p_target.shape == (model.n_layers + 1, 9) and lens.top_ids.shape == (model.n_layers + 1, 9, 3)
    probs = model.next_token_probs([PROMPT])[0]
    assert abs(float(lens.p_target[-1, -1]) - float(probs[lens.target_id])) <= 1e-5
    assert lens.top_ids[-1, -1].tolist() == probs.topk(3).indices.tolist()
    assert float(lens.top_probs.sum(-1).max()) <= 1 + 1e-5
    frame = lens.to_frame()
    assert len(frame) == (model.n_layers + 1) * 9 * 3
    assert type(lens.plot()).__name__ == "Figure" and lens._repr_png_().startswith(b"\x89PNG")
