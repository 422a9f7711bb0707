"""The known-fact filter: greedy continuation contains o_true; verdicts cached per model."""

import pytest
import torch

from tracekit import TracekitError
from tracekit.data import FactRecord, filter_known, is_known, known_flags
from tracekit.store import ResultStore, model_identity

from conftest import tiny


class StubModel:
    """Continues a prompt with a fixed text per subject and counts what it was asked."""

    def __init__(self, spec, answers):
        self.spec, self.answers, self.asked = spec, answers, []

    def generate(self, prompts, max_new_tokens=20):
        assert max_new_tokens == 36
        self.asked += list(prompts)
        return [self.answers[p.split(" is")[0]] for p in prompts]


def fact(i, subject, truth):
    return FactRecord(i, "{} is located in", subject, truth, " Rome", source="counterfact")


RECORDS = [fact(0, "Tower", " Paris"), fact(1, "Bridge", " London"), fact(2, "Gate", " Berlin"),
           fact(3, "Wall", " Beijing"), fact(4, "Dome", " Florence")]
ANSWERS = {"Tower": " the city of Paris, France.", "Bridge": " a city.", "Gate": " Berlin and Potsdam",
           "Wall": " China", "Dome": " Florence"}


def test_is_known():
    assert is_known(" the city of Paris, France", " Paris")
    assert not is_known(" the city of Lyon", " Paris")


def test_filter_and_cache(tmp_path):
    model = StubModel("stub-a", ANSWERS)
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert known_flags(model, RECORDS, cache=store, batch_size=2, progress=False) == [True, False, True, False, True]
        assert len(model.asked) == 5
        kept = filter_known(model, RECORDS, cache=store, progress=False)
        assert [r.case_id for r in kept] == [0, 2, 4] and len(model.asked) == 5  # all from the cache
        other = StubModel("stub-b", {k: " nothing" for k in ANSWERS})  # another model: its own verdicts
        assert filter_known(other, RECORDS, cache=store, progress=False) == []
        assert len(other.asked) == 5
        changed = [FactRecord(0, "{} is found in", "Tower", " Paris", None, source="counterfact")]
        known_flags(model, changed, cache=store, progress=False)
        assert model.asked[-1] == "Tower is found in"  # a changed prompt is not served from the cache


def test_limit_generates_only_as_far_as_needed(tmp_path):
    model = StubModel("stub", ANSWERS)
    assert [r.case_id for r in filter_known(model, RECORDS, limit=1, batch_size=1, progress=False)] == [0]
    assert len(model.asked) == 2  # step = max(batch, 2 * limit)
    with pytest.raises(TracekitError, match="only 3 of 5 records are known"):
        filter_known(StubModel("stub", ANSWERS), RECORDS, limit=4, progress=False)


def test_model_identity_follows_the_weights():
    model = tiny("random:gpt2-tiny")
    first = model_identity(model)
    assert first.startswith("random:gpt2-tiny#") and model_identity(model) == first
    param = next(model.hf.parameters())
    original = param.detach().clone()
    try:
        with torch.no_grad():
            param.view(-1)[0] += 1.0
        assert model_identity(model) != first
    finally:
        with torch.no_grad():
            param.copy_(original)
    assert model_identity(model) == first


def test_filter_runs_on_a_real_model(tmp_path):
    model = tiny("random:gpt2-tiny")
    records = [fact(0, "The Eiffel Tower", " Paris"), fact(1, "The Louvre", " Paris")]
    with ResultStore(tmp_path / "s.sqlite") as store:
        flags = known_flags(model, records, cache=store, new_tokens=8, progress=False)
        assert all(isinstance(f, bool) for f in flags)
        rows = store.frame("known_facts")
        assert len(rows) == 2 and set(rows["new_tokens"]) == {8}
        assert rows["continuation"].map(len).min() > 0
        assert known_flags(model, records, cache=store, new_tokens=8, progress=False) == flags


@pytest.mark.slow
def test_bundled_model_knows_where_the_eiffel_tower_is(smollm):
    prompt = "{} is located in the city of"
    records = [FactRecord(0, prompt, "The Eiffel Tower", " Paris", " Rome", source="counterfact"),
               FactRecord(1, prompt, "The Eiffel Tower", " Beijing", " Paris", source="counterfact")]
    assert known_flags(smollm, records, new_tokens=6, progress=False) == [True, False]  # " Paris, France..."
