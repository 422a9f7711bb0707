"""``tracekit.patch``: equal to a hand-built hooked forward on every backend, causal tracing as one
of its configurations, corruptions, metrics, results."""

import warnings

import pytest
import torch

import tracekit
from tracekit import Noise, Replace, Site, TracekitError
from tracing_models import PROMPT, SUBJECT, one_thread, sharp  # noqa: F401

CORRUPT = "The Space Needle is located in the city of"  # as many tokens as PROMPT
BACKENDS = ("hf", "transformer_lens", "nnsight")
TOL = 1e-5


def reference(model, clean_ids, corrupt_ids, patch, direction, metric):
    """One whole forward per patch with a hand-written hook: the other run's value at the patched
    positions (and head) in every layer of the window, then ``metric`` of the last logits."""
    sites = [Site(patch.kind, layer) for layer in range(patch.lo, patch.hi)]
    base, other = (corrupt_ids, clean_ids) if direction == "denoise" else (clean_ids, corrupt_ids)
    source = model.run(other, capture=sites).captured
    positions = list(patch.positions)

    def put(site):
        def hook(h):
            out = h.clone()
            if patch.head is None:
                out[:, positions] = source[site][:, positions]
            else:
                out[:, positions, patch.head] = source[site][:, positions, patch.head]
            return out
        return hook

    logits = model.run(base, edits={site: put(site) for site in sites}).logits[:, -1]
    return metric(logits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ("denoise", "noise"))
def test_patching_equals_a_hand_built_hooked_forward(backend, direction):
    model = sharp("random:llama-tiny", backend)
    ids = lambda text: torch.tensor([model.tokenizer(text)["input_ids"]])  # noqa: E731
    clean_ids, corrupt_ids = ids(PROMPT), ids(CORRUPT)
    result = tracekit.patch(model, PROMPT, CORRUPT, sites=["resid_pre", "mlp_out", "z", "k", "pattern"],
                            positions=[1, 2, 8, (1, 2)],
                            heads=[1], window=2, metric="logit_diff", target=" Paris", foil=" Seattle",
                            direction=direction)
    a, b = model.tokenizer(" Paris")["input_ids"][0], model.tokenizer(" Seattle")["input_ids"][0]
    metric = lambda logits: logits[:, a] - logits[:, b]  # noqa: E731
    assert len(result.patches) == 5 * 4 * 4  # sites x layers x positions (one head)
    for i, p in enumerate(result.patches):
        want = reference(model, clean_ids, corrupt_ids, p, direction, metric)
        assert abs(float(result.values[i]) - float(want)) <= TOL * max(1.0, abs(float(want))), (p, direction)
    spread = result.values.max() - result.values.min()
    assert spread > 100 * TOL  # patches move the metric by far more than the tolerance


@pytest.mark.parametrize("spec", ("random:gpt2-tiny", "random:gptj-tiny", "random:llama-tiny"))
@pytest.mark.parametrize("kind", ("mlp", "attn", "resid"))
def test_noise_patching_is_causal_tracing(spec, kind):
    """trace() is patch(Noise(subject), denoise, metric='prob'): the same p_restore, p_clean, p_noise."""
    model = sharp(spec)
    traced = tracekit.trace(model, PROMPT, SUBJECT, kind=kind, window=3, samples=4, seed=3)
    result = tracekit.patch(model, PROMPT, Noise(SUBJECT, samples=4, seed=3), sites=kind, window=3, metric="prob")
    matrix, _, _ = result.grid(normalised=False)
    assert float((matrix - traced.p_restore).abs().max()) <= 1e-6
    assert abs(result.m_clean - traced.p_clean) <= 1e-7 and abs(result.m_corrupt - traced.p_noise) <= 1e-7
    assert result.target == traced.answer


def test_corruptions():
    model = sharp("random:gpt2-tiny")
    replaced = tracekit.patch(model, PROMPT, Replace("Eiffel Tower", "Space Needle"), positions="corrupted",
                              layers=[0], metric="prob")
    given = tracekit.patch(model, PROMPT, CORRUPT, positions=[1, 2], layers=[0], metric="prob")
    assert torch.equal(replaced.values, given.values) and replaced.corrupted_span == (1, 3)
    with pytest.raises(TracekitError, match="same length") as err:
        tracekit.patch(model, PROMPT, "The Colosseum is located in the city of")
    assert "\n" not in str(err.value)
    with pytest.raises(TracekitError, match="not in the clean prompt"):
        tracekit.patch(model, PROMPT, Replace("Louvre", "Colosseum"))
    with pytest.raises(TracekitError, match="unknown site"):
        tracekit.patch(model, PROMPT, CORRUPT, sites="mlp_hidden")
    with pytest.raises(TracekitError, match="not mapped for gptj"):
        tracekit.patch(sharp("random:gptj-tiny"), PROMPT, CORRUPT, sites="resid_mid")
    with pytest.raises(TracekitError, match="outside the prompt"):
        tracekit.patch(model, PROMPT, CORRUPT, positions=[12])


def test_metrics_on_the_unpatched_runs():
    model = sharp("random:gpt2-tiny")
    multi = tracekit.patch(model, PROMPT, CORRUPT, layers=[0], positions="last", metric="logprob",
                           target=" Paris Paris")
    assert abs(multi.m_clean - float(model.sequence_logprobs([PROMPT], [" Paris Paris"])[0])) <= 1e-5
    assert abs(multi.m_corrupt - float(model.sequence_logprobs([CORRUPT], [" Paris Paris"])[0])) <= 1e-5
    # patching the last position's block input at layer 0 with the same token changes nothing
    assert abs(float(multi.values[0]) - multi.m_corrupt) <= 1e-5
    kl = tracekit.patch(model, PROMPT, CORRUPT, layers=[0], positions=[1, 2, (1, 2)], metric="kl")
    probs = torch.softmax(model.run(torch.tensor([model.tokenizer(s)["input_ids"] for s in (PROMPT, CORRUPT)]))
                          .logits[:, -1].float(), -1)
    assert kl.m_clean == pytest.approx(0, abs=1e-6)
    assert kl.m_corrupt == pytest.approx(float((probs[0] * (probs[0] / probs[1]).log()).sum()), rel=1e-4)
    assert float(kl.values[2]) == pytest.approx(0, abs=1e-5)  # both corrupted tokens restored at layer 0: clean


def test_a_target_off_a_token_boundary_warns_naming_the_token():
    model = sharp("random:gpt2-tiny")
    with pytest.warns(UserWarning, match=r"'Paris'.*scored as 'Par' .*pass ' Paris'"):
        tracekit.patch(model, PROMPT, CORRUPT, layers=[0], positions="last", target="Paris")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracekit.patch(model, PROMPT, CORRUPT, layers=[0], positions="last", target=" Paris")


def test_head_sweeps_and_results():
    import matplotlib

    model = sharp("random:gpt2-tiny")
    backend = matplotlib.get_backend()
    result = tracekit.patch(model, PROMPT, CORRUPT, sites=["z", "resid_pre"], positions="last", heads="each")
    frame = result.to_frame()
    assert len(frame) == 4 * 4 + 4 and set(frame.site) == {"z", "resid_pre"}
    assert frame[frame.site == "z"]["head"].tolist() == [0, 1, 2, 3] * 4
    matrix, labels, layers = result.grid("z")
    assert matrix.shape == (4, 4) and labels[0] == "head 0" and layers == [0, 1, 2, 3]
    figure = result.plot()
    assert type(figure).__name__ == "Figure" and len(figure.axes) == 4  # two heatmaps and their colour bars
    assert result._repr_png_().startswith(b"\x89PNG")
    assert matplotlib.get_backend() == backend  # no global backend switch
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(result)
    assert "head 3" in console.export_text()


@pytest.mark.parametrize("direction", ("denoise", "noise"))
def test_patching_every_position_of_the_stream_gives_the_other_run(direction):
    """Patching block 0's input at every position turns one run into the other, for every noise sample."""
    model = sharp("random:gptj-tiny")
    result = tracekit.patch(model, PROMPT, Noise(SUBJECT, samples=3), positions=[tuple(range(9)), 8], layers=[0, 2],
                            metric="logprob", direction=direction)
    assert result.per_sample.shape == (4, 3)
    everything = result.per_sample[[0, 2]]
    other = result.m_clean if direction == "denoise" else result.m_corrupt
    assert float((everything.mean(1) - other).abs().max()) <= 1e-5
    if direction == "noise":  # each row is one noised run: its samples differ
        assert float(everything.std(1).min()) > 1e-4
