"""Edits never mix silently: apply/undo check the weights they expect (stacked, nested and
doubly-applied edits are one-line errors or compose in the documented order), and a
non-finite edit is refused."""

import pytest
import torch

from conftest import tiny
from tracekit.editing.api import edit
from tracekit.editing.delta import Edit
from tracekit.errors import TracekitError

SPEC = "random:gpt2-tiny"
NAME = "transformer.h.2.mlp.c_proj.weight"
OTHER = "transformer.h.1.mlp.c_proj.weight"


def _param(model, name=NAME):
    return dict(model.hf.named_parameters())[name]


def _shift(model, amount: float, name=NAME) -> Edit:
    """An edit of one parameter computed on the model's current weights."""
    return Edit(model.hf, {name: _param(model, name).detach() + amount})


@pytest.fixture
def model():
    m = tiny(SPEC)
    base = {n: p.detach().clone() for n, p in m.hf.named_parameters()}
    yield m
    with torch.no_grad():  # leave the shared model as found, whatever a test did
        for n, p in m.hf.named_parameters():
            p.copy_(base[n])


def test_edit_computed_on_top_then_undone_in_the_wrong_order_leaves_the_base_model(model):
    base = _param(model).detach().clone()
    a = _shift(model, 0.5).apply()
    b = _shift(model, 0.25)  # computed on A's weights, not applied
    a.undo()
    b.undo()  # today: wrote A's weights back while both said "not applied"
    assert torch.equal(_param(model), base) and not a.applied and not b.applied
    with pytest.raises(TracekitError, match="no longer holds the weights it was computed on"):
        b.apply()  # B was computed on A: without A it is not B any more
    assert torch.equal(_param(model), base)


def test_stacked_edits_undo_in_reverse_order_only(model):
    base = _param(model).detach().clone()
    a = _shift(model, 0.5).apply()
    b = _shift(model, 0.25).apply()
    with pytest.raises(TracekitError, match="undo the later edit first"):
        a.undo()
    assert torch.equal(_param(model), (base + 0.5) + 0.25)  # nothing half-undone
    b.undo()
    a.undo()
    assert torch.equal(_param(model), base)


def test_nested_edits_of_the_same_weights_are_an_error_not_a_lost_edit(model):
    base = _param(model).detach().clone()
    a, c = _shift(model, 0.5), _shift(model, -0.5)  # both computed on the base model
    with a:
        with pytest.raises(TracekitError, match="cannot apply this edit"):
            with c:
                pass
        assert torch.equal(_param(model), base + 0.5)  # A is still in force inside its block
    assert torch.equal(_param(model), base)


def test_two_edits_computed_on_the_base_model_cannot_both_be_applied(model):
    a, c = _shift(model, 0.5), _shift(model, -0.5)
    a.apply()
    with pytest.raises(TracekitError):
        c.apply()  # today: silently kept only C
    assert a.applied and not c.applied


def test_edits_of_disjoint_weights_compose_in_any_order(model):
    base, other = _param(model).detach().clone(), _param(model, OTHER).detach().clone()
    a, d = _shift(model, 0.5), _shift(model, 0.5, OTHER)
    with a, d:
        assert torch.equal(_param(model), base + 0.5) and torch.equal(_param(model, OTHER), other + 0.5)
    a.apply(), d.apply()
    a.undo(), d.undo()  # not LIFO, but no parameter is shared
    assert torch.equal(_param(model), base) and torch.equal(_param(model, OTHER), other)


def test_apply_and_undo_are_idempotent(model):
    base = _param(model).detach().clone()
    a = _shift(model, 0.5)
    a.undo()  # not applied: nothing to do
    a.apply(), a.apply()
    assert torch.equal(_param(model), base + 0.5)
    a.undo(), a.undo()
    assert torch.equal(_param(model), base)


def test_real_edits_stack_through_the_api(model):
    """FT-1 through ``tracekit.edit``: a second edit computed on the first undoes to the first."""
    base = _param(model, "transformer.h.1.mlp.c_proj.weight").detach().clone()
    first = edit(model, _request(" Rome"), method="ft-1", layer=1, evaluate=False, leave_applied=True)
    second = edit(model, _request(" Tokyo"), method="ft-1", layer=1, evaluate=False)
    first.edit.undo()
    second.edit.undo()
    assert torch.equal(_param(model, "transformer.h.1.mlp.c_proj.weight"), base)
    with pytest.raises(TracekitError):
        second.edit.apply()


def _request(target):
    from tracekit.editing.request import EditRequest

    return EditRequest("{} is located in the city of", "The Eiffel Tower", target)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_edit_is_refused(model, bad):
    value = _param(model).detach().clone()
    value[0, 0] = bad
    with pytest.raises(TracekitError, match="non-finite"):
        Edit(model.hf, {NAME: value})
