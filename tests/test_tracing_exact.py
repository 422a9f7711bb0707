"""The batched engines give the naive loop's numbers (max |p_restore difference| <= 1e-5),
on every backend's partial forward and with exact or bucketed (padded, packed) shapes."""

import pytest
import torch

from tracekit.tracing import naive_trace, trace, trace_many
from tracing_models import PROMPT, SUBJECT, deep, one_thread, sharp  # noqa: F401

TOL = 1e-5
TINY = ("random:gpt2-tiny", "random:gptj-tiny", "random:llama-tiny")
KINDS = ("mlp", "attn", "resid")
_naive: dict = {}


DEEP_TOKENS = (1, 2, 5, 8)  # deeper models: a few tokens keep the naive loop short


def reference(model, kind, window, tokens="all"):
    key = (model.spec, kind, window, tokens)
    if key not in _naive:
        _naive[key] = naive_trace(model, PROMPT, SUBJECT, kind=kind, window=window, samples=2, seed=3, tokens=tokens)
    return _naive[key]


def assert_same(result, ref):
    assert result.answer_id == ref.answer_id
    assert abs(result.p_clean - ref.p_clean) <= TOL
    assert abs(result.p_noise - ref.p_noise) <= TOL
    assert result.p_restore.shape == ref.p_restore.shape
    assert (result.p_restore - ref.p_restore).abs().max() <= TOL
    # The check can fail: restorations move p(answer) by much more than the tolerance.
    assert ref.p_restore.max() - ref.p_restore.min() > 30 * TOL


@pytest.mark.parametrize("spec", TINY)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", (1, 3, 4))
@pytest.mark.parametrize("engine, shapes", [("fast", "exact"), ("fast", "bucketed"), ("generic", None)])
def test_hf_engines_match_naive_on_tiny_models(spec, kind, window, engine, shapes):
    model = sharp(spec)
    ref = reference(model, kind, window)
    result = trace(model, PROMPT, SUBJECT, kind=kind, window=window, samples=2, seed=3, engine=engine, shapes=shapes)
    assert result.config["engine"] == engine
    assert_same(result, ref)


@pytest.mark.parametrize("arch", ("gpt2", "gptj", "llama"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", (1, 3, 5, 10))
@pytest.mark.parametrize("shapes", ("exact", "bucketed"))
def test_fast_engine_matches_naive_on_deeper_models(arch, kind, window, shapes):
    model = deep(arch)
    ref = reference(model, kind, window, DEEP_TOKENS)
    result = trace(model, PROMPT, SUBJECT, kind=kind, window=window, samples=2, seed=3, engine="fast",
                   tokens=DEEP_TOKENS, shapes=shapes)
    assert result.config["forward"] == "blocks"
    assert_same(result, ref)


@pytest.mark.parametrize("backend", ("transformer_lens", "nnsight"))
@pytest.mark.parametrize("spec", TINY)
@pytest.mark.parametrize("kind", KINDS)
def test_other_backends_match_naive(backend, spec, kind):
    """The fast engine through TransformerLens / nnsight (whole passes) equals the naive loop on hf."""
    ref = reference(sharp(spec), kind, 3)
    result = trace(sharp(spec, backend), PROMPT, SUBJECT, kind=kind, window=3, samples=2, seed=3)
    assert result.config["engine"] == "fast" and result.config["forward"] == "whole passes"
    assert_same(result, ref)
    generic = trace(sharp(spec, backend), PROMPT, SUBJECT, kind=kind, window=3, samples=2, seed=3, engine="generic")
    assert_same(generic, ref)


@pytest.mark.parametrize("backend", ("transformer_lens", "nnsight"))
@pytest.mark.parametrize("arch", ("gpt2", "gptj", "llama"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", (1, 3, 10))
def test_other_backends_match_naive_on_deeper_models(backend, arch, kind, window):
    ref = reference(deep(arch), kind, window, DEEP_TOKENS)
    assert_same(trace(deep(arch, backend), PROMPT, SUBJECT, kind=kind, window=window, samples=2, seed=3,
                      tokens=DEEP_TOKENS), ref)


PROMPTS = [  # distinct lengths, the subject at different positions
    (PROMPT, SUBJECT),
    ("Where is it? The Eiffel Tower is located in the city of", SUBJECT),
    ("The Colosseum is in Rome", "The Colosseum"),
    ("Steve Jobs was the founder of", "Steve Jobs"),
    ("The capital of France is the city of", "France"),
]


@pytest.mark.parametrize("arch", ("gpt2", "gptj", "llama"))
@pytest.mark.parametrize("kind", ("mlp", "resid"))
def test_packed_prompts_match_naive(arch, kind):
    """trace_many with bucketed shapes records every prompt's base runs in one pass and mixes rows of
    different prompts and start positions in one pass: each result still equals its own naive loop."""
    model = deep(arch)
    out = list(trace_many(model, PROMPTS, batch=len(PROMPTS), progress=False, kind=kind, window=3, samples=2,
                          seed=3, shapes="bucketed"))
    for (prompt, subject), (_, result) in zip(PROMPTS, out):
        ref = naive_trace(model, prompt, subject, kind=kind, window=3, samples=2, seed=3)
        assert (result.p_restore - ref.p_restore).abs().max() <= TOL
        assert abs(result.p_noise - ref.p_noise) <= TOL and abs(result.p_clean - ref.p_clean) <= TOL


def test_naive_on_other_backend_matches_naive_on_hf():
    ref = reference(sharp("random:gptj-tiny"), "attn", 3)
    other = naive_trace(sharp("random:gptj-tiny", "nnsight"), PROMPT, SUBJECT, kind="attn", window=3, samples=2, seed=3)
    assert_same(other, ref)


@pytest.mark.parametrize("engine, shapes", [("fast", "exact"), ("fast", "bucketed"), ("generic", None)])
def test_small_batches_give_the_same_numbers(engine, shapes):
    """batch_tokens forces many small passes; chunk boundaries must not change anything."""
    model = deep("gpt2")
    kw = dict(window=5, samples=2, engine=engine, tokens=DEEP_TOKENS, shapes=shapes)
    big = trace(model, PROMPT, SUBJECT, **kw)
    small = trace(model, PROMPT, SUBJECT, batch_tokens=20, **kw)
    assert (big.p_restore - small.p_restore).abs().max() <= 1e-6


def test_token_subsets_match_the_full_map():
    model = sharp("random:llama-tiny")
    full = trace(model, PROMPT, SUBJECT, window=3, samples=2)
    some = trace(model, PROMPT, SUBJECT, window=3, samples=2, tokens=[2, -1])
    last = trace(model, PROMPT, SUBJECT, window=3, samples=2, tokens="subject_last")
    assert some.positions == [2, len(full.tokens) - 1]
    assert torch.allclose(some.p_restore, full.p_restore[[2, -1]], atol=1e-6)
    assert torch.allclose(last.p_restore[0], full.p_restore[full.subject_span[1] - 1], atol=1e-6)
