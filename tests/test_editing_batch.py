"""Batched requests: v* of several requests in one pass per step equals single optimisations;
mass and sequential editing; Edit.save / Edit.load."""

import json

import pytest
import torch

from conftest import tiny
from tracekit.editing.hparams import MEMITHyperParams, ROMEHyperParams
from tracekit.editing.kv_batch import find_values
from tracekit.editing.kv_core import build_rows, optimize_value, ValueObjective
from tracekit.editing.memit import apply_memit, memit_edits
from tracekit.editing.request import EditRequest
from tracekit.editing.rome import apply_rome, rome_edits
from tracing_models import one_thread  # noqa: F401  (one intra-op thread for tiny models)

TEMPLATES = ["{}", "The capital of Japan is Tokyo. {}", "Hello. {}"]
# different lengths, target lengths, subjects inside and at the end, one Fact Erasure request
REQUESTS = [EditRequest("We visited {}", "The Eiffel Tower", " Rome"),
            EditRequest("{} is located in the city of", "Big Ben", " Paris Tower"),
            EditRequest("The home of {} is", "the Louvre", " Tokyo", minimize=True),
            EditRequest("Everyone knows that {}", "Notre Dame", " is in Berlin")]
HP = dict(mom2_ridge=1e-2, context_lengths=((3, 2),), v_num_grad_steps=10, v_weight_decay=0.0, clamp_norm_factor=1e3)


def _C(model, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        d = model.adapter.as_out_in(model.adapter.down_proj_weight(model.hf, layer)).shape[1]
        a = torch.randn(d, 2 * d, generator=g)
        out[layer] = a @ a.T / (2 * d)
    return out


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spec, stop_below", [("random:gpt2-tiny", 0.05), ("random:llama-tiny", 0.05),
                                              ("random:gpt2-tiny", 12.0)])  # 12: some requests stop early
def test_batched_v_star_equals_single_optimisations(spec, stop_below):
    model = tiny(spec)
    hp = ROMEHyperParams(**HP, v_stop_below=stop_below)
    rows = [build_rows(model, r, TEMPLATES, hp.kl_prompt) for r in REQUESTS]
    together = find_values(model, rows, 1, hp, [r.minimize for r in REQUESTS], "mlp", batch=len(REQUESTS))
    assert {f.batch for f in together} == {len(REQUESTS)}
    for request, row, found in zip(REQUESTS, rows, together):
        alone = optimize_value(ValueObjective(model, row, 1), hp, request.minimize, "mlp")
        assert found.result.steps == alone.steps
        if alone.steps:  # |difference| / |delta| (floating-point reassociation across batch shapes: ~1e-6)
            assert relative(found.result.delta, alone.delta) <= 1e-5
        else:
            assert torch.equal(found.result.delta, alone.delta)
        assert found.result.final_nll == pytest.approx(alone.final_nll, abs=1e-5)


def test_rome_and_memit_edits_of_many_requests_equal_one_by_one():
    model = tiny("random:gpt2-tiny")
    C = _C(model, range(4))
    rome = ROMEHyperParams(**HP)
    batched = rome_edits(model, REQUESTS, 2, rome, templates=TEMPLATES, second_moment=C[2], batch=3)
    for request, edit in zip(REQUESTS, batched):
        alone = apply_rome(model, request, 2, rome, templates=TEMPLATES, second_moment=C[2])
        name = alone.parameter_names[0]
        assert relative(edit.delta(name), alone.delta(name)) <= 1e-5
        assert edit.info.details["batch"] in (3, 1) and not edit.applied
    memit = MEMITHyperParams(window=3, mom2_update_weight=1.0, **HP)
    batched = memit_edits(model, REQUESTS[:2], 2, memit, templates=TEMPLATES, second_moment=C)
    for request, edit in zip(REQUESTS[:2], batched):
        alone = apply_memit(model, request, 2, memit, templates=TEMPLATES, second_moment=C)
        for name in alone.parameter_names:
            assert relative(edit.delta(name), alone.delta(name)) <= 1e-5


def test_several_points_scored_in_one_pass_equal_one_by_one():
    from tracekit.editing.finetune import FTHyperParams, apply_ft
    from tracekit.editing.metrics import MetricsConfig, evaluate_edit, evaluate_edits
    from tracekit.editing.problems import setup_from_request

    model = tiny("random:gpt2-tiny")
    C = _C(model, range(4))
    rome = ROMEHyperParams(**HP)
    edits = rome_edits(model, REQUESTS[:3], 1, rome, templates=TEMPLATES, second_moment=C[1])
    edits.append(apply_memit(model, REQUESTS[3], 2, MEMITHyperParams(window=3, mom2_update_weight=1.0, **HP),
                             templates=TEMPLATES, second_moment=C))
    edits.append(apply_ft(model, REQUESTS[0], 2, FTHyperParams(n_layers=1, steps=3, lr=1e-2)))  # weight and bias
    setups = [setup_from_request(r) for r in REQUESTS] + [setup_from_request(REQUESTS[0])]
    config = MetricsConfig(essence_samples=2, essence_max_tokens=12)
    together = evaluate_edits(model, setups, edits, config)
    for setup, edit, scores in zip(setups, edits, together):
        alone = evaluate_edit(model, setup, edit, config)
        assert scores.scores.keys() == alone.scores.keys()
        for key, value in alone.scores.items():
            assert scores.scores[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
        assert [r.p_after for r in scores.rows] == pytest.approx([r.p_after for r in alone.rows], rel=1e-4, abs=1e-7)
    assert not any(e.applied for e in edits)


def test_a_batched_sweep_stores_the_scores_of_an_item_by_item_sweep(tmp_path, monkeypatch):
    from tracekit.data import FactRecord
    from tracekit.editing.metrics import MetricsConfig
    from tracekit.store import ResultStore
    from tracekit.studies import EditTask, LocalExecutor

    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.\n\n" * 80)
    model = tiny("random:gpt2-tiny")
    records = [FactRecord(case_id=i, prompt=p, subject=s, target_true=" Paris", target_new=" Rome",
                          paraphrase_prompts=("Where is it? {} is in",), neighborhood_prompts=("The Louvre is in",))
               for i, (p, s) in enumerate([("{} is located in", "The Eiffel Tower"), ("We saw {} in", "Notre Dame"),
                                           ("{} is in", "Big Ben")])]
    hp = ROMEHyperParams(corpus=str(corpus), mom2_n_samples=40, mom2_sample_tokens=32, **HP)
    tables = {}
    for batch, score_batch in ((1, None), (3, None), (3, 1)):
        task = EditTask(methods=("rome",), layers=(1, 3), hparams=hp, metrics=MetricsConfig(essence=False), batch=batch,
                        score_batch=score_batch)
        store = ResultStore(tmp_path / f"b{batch}-{score_batch}.sqlite")
        report = LocalExecutor(model).run(task, store, task.items("tiny", records), progress=False)
        assert report.computed == 6 and not report.failed
        tables[batch, score_batch] = {(r["case_id"], r["layer"]): r for r in store.edits_frame().to_dict("records")}
        assert {json.loads(r).get("seconds_batch", 1) for r in store.frame("edits")["result"]} == {batch}
    for key, row in tables[1, None].items():
        for name in ("rewrite", "paraphrase", "neighborhood", "overall"):
            for batched in ((3, None), (3, 1)):
                assert tables[batched][key][name] == pytest.approx(row[name], rel=1e-4, abs=1e-6), (key, name)


# ---- mass and sequential editing, saved edits ----------------------------------------------------
SUBJECTS = ["The Eiffel Tower", "Big Ben", "Notre Dame", "The Louvre", "The Colosseum", "The Kremlin",
            "Times Square", "The Parthenon", "Mount Fuji", "The Alhambra"]
TARGETS = [" Rome", " Tokyo", " Berlin", " Madrid", " Cairo", " Oslo", " Lima", " Delhi", " Quito", " Perth"]


def _p(model, request):
    return float(model.target_probs([request.text], request.target)[0])


def test_mass_memit_over_ten_requests_raises_each_target():
    from tracekit.editing.memit import apply_memit_mass

    model = tiny("random:gpt2-tiny")
    requests = [EditRequest("We visited {}", s, t) for s, t in zip(SUBJECTS, TARGETS)]
    hp = MEMITHyperParams(window=3, mom2_update_weight=1.0, **{**HP, "v_num_grad_steps": 15})
    before = [_p(model, r) for r in requests]
    edit = apply_memit_mass(model, requests, 2, hp, templates=TEMPLATES, second_moment=_C(model, range(4)))
    assert edit.info.details["requests"] == 10 and len(edit.parameter_names) == 3
    with edit:
        after = [_p(model, r) for r in requests]
    assert all(a > 1.5 * b for a, b in zip(after, before)), list(zip(before, after))


def test_sequential_edits_build_on_each_other():
    from tracekit.editing.api import edit_sequentially

    model = tiny("random:gpt2-tiny")
    requests = [EditRequest("We visited {}", s, t) for s, t in zip(SUBJECTS[:3], TARGETS[:3])]
    rome = ROMEHyperParams(corpus=None, **HP)
    C = _C(model, [2])
    original = model.adapter.down_proj_weight(model.hf, 2).detach().clone()
    first = apply_rome(model, requests[0], 2, rome, templates=TEMPLATES, second_moment=C[2])
    with first:  # the second edit computed on the first's weights, by hand
        second = apply_rome(model, requests[1], 2, rome, templates=TEMPLATES, second_moment=C[2])
    together = edit_sequentially(model, requests[:2], "rome", 2, rome, templates=TEMPLATES, second_moment=C)
    name = together.parameter_names[0]
    expected = first.delta(name) + second.delta(name)
    assert relative(together.delta(name), expected) <= 1e-5
    assert torch.equal(model.adapter.down_proj_weight(model.hf, 2), original)  # left as found
    with together:
        assert all(_p(model, r) > 0 for r in requests[:2])


def test_a_saved_edit_loads_and_applies_bit_for_bit(tmp_path):
    from tracekit.errors import TracekitError

    model = tiny("random:gpt2-tiny")
    edit = apply_memit(model, REQUESTS[0], 2, MEMITHyperParams(window=3, mom2_update_weight=1.0, **HP),
                       templates=TEMPLATES, second_moment=_C(model, range(4)))
    path = edit.save(tmp_path / "edit.safetensors")
    loaded = type(edit).load(path, model)
    assert loaded.parameter_names == edit.parameter_names and loaded.info["method"] == "memit"
    params = dict(model.hf.named_parameters())
    with edit:
        expected = {n: params[n].detach().clone() for n in edit.parameter_names}
    with loaded:
        for name in edit.parameter_names:
            assert torch.equal(params[name], expected[name])
    for name in edit.parameter_names:  # undo restored the originals too
        assert torch.equal(params[name], edit._old[name])
    # another model (a different seed of the same architecture): a one-line error naming the fingerprint
    import tracekit

    other = tracekit.load_model("random:gpt2-tiny", seed=1, device="cpu")
    with pytest.raises(TracekitError, match="fingerprint") as err:
        type(edit).load(path, other)
    assert "\n" not in str(err.value)
    with edit:  # the same model holding another edit: refused too
        with pytest.raises(TracekitError, match="fingerprint|not the weight"):
            type(edit).load(path, model)


@pytest.mark.parametrize("spec", ["random:gpt2-tiny", "random:llama-tiny"])
def test_fact_forcing_v_star_in_shared_whole_passes_equals_one_by_one(spec):
    """Noise drawn afresh per pass (the paper code's Fact Forcing): the requests share whole passes,
    each drawing its own rows' noise from its own stream, so each sees the draws it would alone."""
    from tracekit.data.loaders import load_dataset
    from tracekit.editing.problems import prepare

    model = tiny(spec)
    C = _C(model, range(4))
    requests = [prepare(model, r, "fact-forcing").request for r in load_dataset("worldfacts")[:3]]
    assert all(r.noise is not None for r in requests)
    rome = ROMEHyperParams(**HP)
    batched = rome_edits(model, requests, 2, rome, templates=TEMPLATES, second_moment=C[2], batch=3)
    for request, edit in zip(requests, batched):
        alone = apply_rome(model, request, 2, rome, templates=TEMPLATES, second_moment=C[2])
        assert edit.info.details["batch"] == 3 and alone.info.details["batch"] == 1
        name = alone.parameter_names[0]
        assert relative(edit.delta(name), alone.delta(name)) <= 1e-5
    memit = MEMITHyperParams(window=3, mom2_update_weight=1.0, **HP)
    batched = memit_edits(model, requests, 2, memit, templates=TEMPLATES, second_moment=C, batch=3)
    for request, edit in zip(requests, batched):
        alone = apply_memit(model, request, 2, memit, templates=TEMPLATES, second_moment=C)
        for name in alone.parameter_names:
            assert relative(edit.delta(name), alone.delta(name)) <= 1e-5
