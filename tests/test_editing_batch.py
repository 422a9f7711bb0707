"""Batched requests: v* of several requests in one pass per step equals single optimisations;
mass and sequential editing; Edit.save / Edit.load."""

import dataclasses

import pytest
import torch

from conftest import tiny
from tracekit.editing.hparams import MEMITHyperParams, ROMEHyperParams
from tracekit.editing.kv_batch import find_values
from tracekit.editing.kv_core import build_rows, optimize_value, ValueObjective
from tracekit.editing.memit import apply_memit, memit_edits
from tracekit.editing.request import EditRequest
from tracekit.editing.rome import apply_rome, rome_edits

TEMPLATES = ["{}", "The capital of Japan is Tokyo. {}", "Hello. {}"]
# different lengths, target lengths, subjects inside and at the end, one Fact Erasure request
REQUESTS = [EditRequest("We visited {}", "The Eiffel Tower", " Rome"),
            EditRequest("{} is located in the city of", "Big Ben", " Paris Tower"),
            EditRequest("The home of {} is", "the Louvre", " Tokyo", minimize=True),
            EditRequest("Everyone knows that {}", "Notre Dame", " is in Berlin")]
HP = dict(mom2_ridge=1e-2, context_lengths=((3, 2),), v_num_grad_steps=10, v_weight_decay=0.0, clamp_norm_factor=1e3)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
