"""Bucketed shapes: the attention shapes a trace meets are few, on the shape grid, and do not grow
with the number of prompts or their lengths; packing mixes prompts without changing numbers."""

import pytest
import torch

from tracekit.adapters.partial import COLUMN_STEPS, ROW_STEPS, bucket, bucket_grid, collect_stats
from tracekit.tracing import trace, trace_many
from tracing_models import deep, one_thread  # noqa: F401

PROMPTS = [  # seven distinct token lengths, 5..19
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("Where is it? The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("The Colosseum is in Rome", "The Colosseum"),
    ("Steve Jobs was the founder of the company called", "Steve Jobs"),
    ("The capital of France is the city of", "France"),
    ("Toko Yasuda plays the guitar and the", "Toko Yasuda"),
    ("Michael Jordan plays basketball in the city of the", "Michael Jordan"),
]
KW = dict(window=3, samples=2, seed=3)


@pytest.fixture
def attention_shapes(monkeypatch):
    """(rows, queries, keys) of every scaled_dot_product_attention call."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        seen.append((query.shape[0], query.shape[2], key.shape[2]))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def widths(length: int) -> set[int]:
    return {bucket(w, COLUMN_STEPS) for w in range(1, length + 1)}


def warm(model):
    """The noise scale is measured once per model, by a whole forward pass of its own."""
    trace(model, *PROMPTS[0], shapes="bucketed", **KW)


def test_attention_shapes_per_prompt_are_bounded_by_the_buckets(attention_shapes):
    model = deep("gptj")  # (Llama's grouped-query attention folds one query into several for SDPA)
    warm(model)
    for prompt, subject in PROMPTS:
        attention_shapes.clear()
        result = trace(model, prompt, subject, shapes="bucketed", **KW)
        T, rows = len(result.tokens), len(result.tokens) * model.n_layers * KW["samples"]
        shapes = set(attention_shapes)
        for b, q, k in shapes:  # every dimension on the grid
            assert b == bucket(b, ROW_STEPS) and q == bucket(q, COLUMN_STEPS)
            assert k == q or k - q == bucket(k - q, COLUMN_STEPS)
        # one (queries, keys) per width bucket (+ the base run); one row count per grid value
        assert len({(q, k) for _, q, k in shapes}) <= len(widths(T)) + 1
        assert len({b for b, _, _ in shapes}) <= len(bucket_grid(rows, ROW_STEPS))
        assert len(shapes) <= (len(widths(T)) + 1) * len(bucket_grid(rows, ROW_STEPS))


def test_packed_prompts_share_the_shapes_of_the_longest(attention_shapes):
    """Seven prompts of distinct lengths traced together meet no more (queries, keys) shapes than
    the longest one alone, and far fewer shapes than exact passes."""
    model = deep("gpt2")
    warm(model)
    longest = max(len(model.tokens(p)) for p, _ in PROMPTS)
    counts = {}
    for shapes in ("exact", "bucketed"):
        attention_shapes.clear()
        with collect_stats() as stats:
            list(trace_many(model, PROMPTS, batch=len(PROMPTS), progress=False, shapes=shapes, **KW))
        counts[shapes] = set(attention_shapes)
        assert stats.block_calls == len(attention_shapes)  # every pass of a trace goes through the seam
    assert len({(q, k) for _, q, k in counts["bucketed"]}) <= len(widths(longest)) + 1
    assert len(counts["bucketed"]) * 4 < len(counts["exact"])
