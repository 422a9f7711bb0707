"""Causal tracing on the bundled SmolLM2-135M (slow: loads the real model)."""

import pytest

from tracekit.tracing import naive_trace, trace

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eiffel(smollm):
    return trace(smollm, PROMPT, SUBJECT, " Paris", kind="mlp", window=10, samples=5)


def test_noise_hurts_and_mlp_effects_sit_on_the_subject(eiffel):
    assert eiffel.answer == " Paris"
    assert eiffel.p_clean > 2 * eiffel.p_noise
    start, end = eiffel.subject_span
    assert (start, end) == (1, 5)  # '<|endoftext|>' (the document start), then 'The', ' E', 'iffel', ' Tower'
    token, layer = divmod(int(eiffel.effect.argmax()), eiffel.n_layers)
    assert start <= eiffel.positions[token] < end, "largest MLP effect is not on a subject token"
    # The subject's MLP effects beat those of every token after it but the last (ROME's picture).
    rows = list(eiffel.positions)
    subject_best = eiffel.effect[rows.index(start):rows.index(end - 1) + 1].max()
    assert subject_best > eiffel.effect[rows.index(end):-1].max()


def test_fast_engine_equals_the_naive_loop_on_the_real_model(smollm):
    kw = dict(kind="mlp", window=10, samples=2, tokens=[3])  # 'iffel'
    fast = trace(smollm, PROMPT, SUBJECT, " Paris", **kw)
    naive = naive_trace(smollm, PROMPT, SUBJECT, " Paris", **kw)
    assert fast.config["engine"] == "fast"
    assert (fast.p_restore - naive.p_restore).abs().max() <= 1e-5
    assert abs(fast.p_noise - naive.p_noise) <= 1e-5 and abs(fast.p_clean - naive.p_clean) <= 1e-5
