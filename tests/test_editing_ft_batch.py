"""FT of several requests in shared passes (tracekit.editing.finetune_batch) equals apply_ft one by one."""

import dataclasses

import pytest
import torch

from conftest import BACKENDS, tiny
from test_editing_ft import six_layers
from tracekit.editing.finetune import FTHyperParams, apply_ft
from tracekit.editing.finetune_batch import apply_ft_many
from tracekit.editing.request import EditRequest
from tracing_models import one_thread  # noqa: F401  (one intra-op thread for tiny models)

# different prompt and target lengths, a subject at the end, a Fact Erasure request
REQUESTS = [EditRequest("We visited {}", "The Eiffel Tower", " Rome"),
            EditRequest("{} is located in the city of", "Big Ben", " Paris Tower"),
            EditRequest("The home of {} is", "the Louvre", " Tokyo", minimize=True),
            EditRequest("Everyone knows that {}", "Notre Dame", " is in Berlin")]
STRONG = FTHyperParams(lr=5e-2, norm_constraint=5e-2, steps=8)


def assert_same_edits(model, requests, layer, hp):
    together = apply_ft_many(model, requests, layer, hp)
    for request, edit in zip(requests, together):
        alone = apply_ft(model, request, layer, hp)
        assert edit.info.steps_taken == alone.info.steps_taken
        assert edit.info.losses == pytest.approx(alone.info.losses, rel=1e-5, abs=1e-7)
        assert edit.parameter_names == alone.parameter_names
        for name in alone.parameter_names:  # |difference| / |change| (floating-point reassociation only)
            change = alone.delta(name).norm()
            difference = float((edit.delta(name) - alone.delta(name)).norm() / change) if change else \
                float(edit.delta(name).norm())  # no step taken: no change at all
            assert difference <= 1e-5, (name, difference)
    return together


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
@pytest.mark.parametrize("n_layers", [1, 5])
def test_tuned_together_equals_one_by_one(arch, n_layers):
    model = six_layers(arch)
    edits = assert_same_edits(model, REQUESTS, 2, dataclasses.replace(STRONG, n_layers=n_layers))
    assert {e.info.details["batch"] for e in edits} == {len(REQUESTS)}
    assert all(len(e.info.layers) == n_layers for e in edits)
    assert sum(e.info.steps_taken > 0 for e in edits) >= 3


def test_early_stops_are_each_requests_own():
    """A loose stop_loss ends some requests after a step or two, the others go on."""
    model = six_layers("gpt2")
    edits = assert_same_edits(model, REQUESTS, 2, dataclasses.replace(STRONG, stop_loss=8.0))
    assert len({len(e.info.losses) for e in edits}) > 1


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "hf"])
def test_other_backends_tune_together_too(backend):
    model = tiny("random:gpt2-tiny", backend=backend)
    assert_same_edits(model, REQUESTS[:2], 1, STRONG)


def test_noised_requests_and_single_batches_run_alone(monkeypatch):
    from tracekit.editing import finetune_batch

    calls = []
    monkeypatch.setattr(finetune_batch, "_tune_together", lambda m, rs, *a: calls.append(len(rs)) or
                        [apply_ft(m, r, *a) for r in rs])
    model = six_layers("gpt2")
    apply_ft_many(model, REQUESTS[:1], 2, STRONG)
    assert calls == []
    apply_ft_many(model, REQUESTS, 2, STRONG)
    assert calls == [len(REQUESTS)]


def test_weights_untouched():
    model = six_layers("llama")
    before = {n: p.clone() for n, p in model.hf.named_parameters()}
    apply_ft_many(model, REQUESTS, 2, STRONG)
    assert all(torch.equal(before[n], p) for n, p in model.hf.named_parameters())


@pytest.mark.parametrize("score_batch", [None, 1])
def test_edit_many_tunes_fine_tuning_points_together_and_scores_as_edit_does(monkeypatch, score_batch):
    from tracekit.data.loaders import load_dataset
    from tracekit.editing import finetune_batch
    from tracekit.editing.api import edit, edit_many
    from tracekit.editing.metrics import MetricsConfig

    calls = []
    together = finetune_batch._tune_together
    monkeypatch.setattr(finetune_batch, "_tune_together", lambda m, rs, *a: calls.append(len(rs)) or together(m, rs, *a))
    model = tiny("random:gpt2-tiny")
    records = load_dataset("worldfacts")[:3]
    hp = dataclasses.replace(STRONG, steps=4)
    metrics = MetricsConfig(essence=False)
    results = edit_many(model, records, "ft-1", layer=1, hparams=hp, metrics=metrics, batch=3,
                        score_batch=score_batch)
    assert calls == [3]
    for record, result in zip(records, results):
        alone = edit(model, record, "ft-1", layer=1, hparams=hp, metrics=metrics)
        for name, value in alone.scores.scores.items():
            assert result.scores.scores[name] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), name


def test_points_tuned_together_and_scored_one_by_one_keep_their_before_passes(monkeypatch):
    """With a batch scored one by one inside a sweep's baseline cache, every point's after-pass
    starts at the edited layer from its kept "before" inputs, not from the embeddings: the cache
    keeps the whole batch's inputs, not only the last two points'."""
    from tracekit.data.loaders import load_dataset
    from tracekit.editing import metrics as metrics_module
    from tracekit.editing.api import edit_many
    from tracekit.editing.metrics import MetricsConfig, baseline_cached

    model = tiny("random:gpt2-tiny")
    records = load_dataset("worldfacts")[:6]  # more points than the cache keeps by default (4 passes)
    hp = dataclasses.replace(STRONG, steps=2)
    metrics = MetricsConfig(essence=False)
    starts = []
    passes = metrics_module.token_logprobs
    monkeypatch.setattr(metrics_module, "token_logprobs",
                        lambda m, q, **kw: starts.append(kw.get("start")) or passes(m, q, **kw))
    with baseline_cached(model):
        first = edit_many(model, records, "ft-1", layer=2, hparams=hp, metrics=metrics, batch=6, score_batch=1)
        starts.clear()
        again = edit_many(model, records, "ft-1", layer=2, hparams=hp, metrics=metrics, batch=6, score_batch=1)
    assert len(starts) == 6 and all(s is not None and s[0] == 2 for s in starts)
    for a, b in zip(first, again):
        assert a.scores.scores == pytest.approx(b.scores.scores, rel=1e-5, nan_ok=True)


def test_score_batch_must_be_positive():
    from tracekit.data.loaders import load_dataset
    from tracekit.editing.api import edit_many
    from tracekit.errors import TracekitError

    with pytest.raises(TracekitError, match="score_batch"):
        edit_many(tiny("random:gpt2-tiny"), load_dataset("worldfacts")[:2], "ft-1", layer=1, batch=2, score_batch=0)
