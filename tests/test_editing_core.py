"""The ROME/MEMIT key-value core: rows, the two v* engines, the update solve, key
statistics (streaming, cache, stale and foreign files), context templates, fingerprints."""

import warnings

import pytest
import torch

from conftest import TINY_SPECS, tiny
from tracekit.adapters import Site
from tracekit.editing import covariance as cov
from tracekit.identity import key_fingerprint, weight_fingerprint
from tracekit.editing.context import context_templates
from tracekit.editing.kv_core import ValueObjective, build_rows, solve_update
from tracekit.editing.request import EditRequest
from tracekit.errors import TracekitError

TEXT = (
    "The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.\n"
    "The mother tongue of Danielle Darrieux is French. She speaks English and French.\n\n"
    "The Space Needle is in downtown Seattle. Michael Jordan plays basketball.\n"
    "Steve Jobs was the founder of Apple. Microsoft was founded by Bill Gates.\n\n"
) * 12
TEMPLATES = ["{}", "The capital of Italy is Rome. {}", "Michael Jordan plays basketball. {}"]
REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRACEKIT_DATA", str(tmp_path / "no-data"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


# ---- rows ----------------------------------------------------------------------------
def test_rows_score_every_target_token_after_its_prefix():
    model = tiny("random:gpt2-tiny")
    request = EditRequest("{} is located in the city of", "The Eiffel Tower", " Seattle Paris")
    rows = build_rows(model, request, TEMPLATES, "{} is a")
    target = model.target_ids(" Seattle Paris")
    assert rows.n_templates == 3 and rows.has_kl and len(target) >= 2
    for r in range(3):
        ids = rows.input_ids[r]
        last = int(rows.subject_last[r])
        assert model.tokenizer.decode(ids[: last + 1]).endswith("Tower")  # last subject token
        pos = rows.target_pos[r]
        assert ids[pos[1:]].tolist() == target[:-1]  # teacher forcing: token j sits at pos[j] + 1
        assert int(pos[0]) == len(model.tokenizer(TEMPLATES[r].format(request.text))["input_ids"]) - 1
    assert int(rows.lengths[3]) == len(model.tokenizer("The Eiffel Tower is a")["input_ids"])


def _embed_noise(model, rows):
    """What the edit passes add to the token embeddings of every row (one pass's plan)."""
    from tracekit.editing.kv_core import NoisePasses

    hook = NoisePasses(rows, model.d_model).edits(range(rows.input_ids.shape[0]))[Site("embed")]
    return hook(torch.zeros(*rows.input_ids.shape, model.d_model))


def test_tracekit_noise_is_added_to_subject_tokens_of_every_row():
    model = tiny("random:llama-tiny")
    start, end = model.subject_span(REQUEST.text, REQUEST.subject)
    noise = torch.randn(end - start, model.d_model)
    rows = build_rows(model, EditRequest(REQUEST.prompt, REQUEST.subject, REQUEST.target, noise=noise), TEMPLATES, None)
    added = _embed_noise(model, rows)
    for r in range(3):
        last = int(rows.subject_last[r])
        assert torch.equal(added[r, last - (end - start) + 1: last + 1], noise)
        assert float(added[r].abs().sum()) == pytest.approx(float(noise.abs().sum()), rel=1e-6)  # nowhere else


def test_paper_code_noise_lands_on_the_prompts_span_in_every_row_afresh_each_pass():
    """google/belief-localization's Fact Forcing: x[:, b:e] += noise for every row of the batch,
    (b, e) the edit prompt's subject span, a new RandomState(1) draw per pass."""
    import numpy as np

    from tracekit.editing.subject_noise import make_subject_noise
    from tracekit.editing.kv_core import NoisePasses

    model = tiny("random:gpt2-tiny")
    noise = make_subject_noise(model, REQUEST.text, REQUEST.subject, noise=0.1, convention="paper-code")
    rows = build_rows(model, EditRequest(REQUEST.prompt, REQUEST.subject, REQUEST.target, noise=noise), TEMPLATES, "{} is a")
    b, e = noise.prompt_span
    passes = NoisePasses(rows, model.d_model)
    shape = (*rows.input_ids.shape, model.d_model)
    first = passes.edits(range(4))[Site("embed")](torch.zeros(shape))
    second = passes.edits(range(4))[Site("embed")](torch.zeros(shape))
    rng = np.random.RandomState(1)
    for added in (first, second):
        expected = torch.from_numpy(rng.randn(4, e - b, model.d_model)).float() * 0.1
        torch.testing.assert_close(added[:, b:e], expected)
        assert float(added.abs().sum()) == pytest.approx(float(expected.abs().sum()), rel=1e-5)


# ---- the two engines ----------------------------------------------------------------------
@pytest.mark.parametrize("spec", TINY_SPECS)
def test_blocks_engine_equals_whole_forward_with_mlp_hook(spec):
    """Prefix reuse + suffix-only blocks give the same losses and gradients as full passes."""
    model = tiny(spec)
    start, end = model.subject_span(REQUEST.text, REQUEST.subject)
    noise = 0.3 * torch.randn(end - start, model.d_model)
    request = EditRequest(REQUEST.prompt, REQUEST.subject, " Rome Paris", noise=noise)
    rows = build_rows(model, request, TEMPLATES, "{} is a")
    delta = torch.randn(model.d_model)
    results = []
    for engine in ("blocks", "hooks"):
        objective = ValueObjective(model, rows, 1, engine)
        x = delta.clone().requires_grad_()
        nll, kl = objective(x)
        (nll + kl).backward()
        results.append((nll.detach(), kl.detach(), x.grad, objective.initial.keys, objective.initial.mlp_out,
                        objective.initial.resid))
    fast, full = results
    assert float(fast[1]) > 0  # the delta moved the KL prompt's distribution
    for a, b in zip(fast, full):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_zero_delta_leaves_the_kl_term_at_zero():
    model = tiny("random:gptj-tiny")
    objective = ValueObjective(model, build_rows(model, REQUEST, TEMPLATES, "{} is a"), 2)
    nll, kl = objective(torch.zeros(model.d_model))
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    probs = model.target_probs([t.format(REQUEST.text) for t in TEMPLATES], " Rome")
    assert float(nll) == pytest.approx(float(-probs.log().mean()), rel=1e-5)  # one-token target


# ---- the update ---------------------------------------------------------------------------
def _spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + d * torch.eye(d, dtype=torch.float64)


def test_solve_update_is_romes_rank_one_formula():
    C, k, r = _spd(6), torch.randn(6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    update = solve_update(C, k[:, None], r[:, None]).double()
    u = torch.linalg.solve(C, k)
    torch.testing.assert_close(update, torch.outer(r, u) / (u @ k), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(update @ k, r, rtol=1e-5, atol=1e-6)  # W' k* = W k* + (v* - W k*)
    singular = torch.linalg.svdvals(update)
    assert singular[1] < 1e-6 * singular[0]  # rank one


def test_solve_update_with_lambda_is_memits_solve():
    C, K, R = _spd(6, 1), torch.randn(6, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    update = solve_update(C, K, R, lam=3.0).double()
    torch.testing.assert_close(update, R @ torch.linalg.solve(3.0 * C + K @ K.T, K).T, rtol=1e-5, atol=1e-6)
    ridge = solve_update(C, K[:, :1], R[:, :1], ridge=0.5).double()
    A = C + 0.5 * C.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    u = torch.linalg.solve(A, K[:, 0])
    torch.testing.assert_close(ridge, torch.outer(R[:, 0], u) / (u @ K[:, 0]), rtol=1e-5, atol=1e-6)


# ---- key statistics -------------------------------------------------------------------------
def test_second_moment_equals_a_direct_computation(corpus):
    model = tiny("random:gpt2-tiny")
    stats = cov.second_moments(model, [1, 3], n_samples=10, sample_tokens=16, corpus=corpus, batch_size=3, progress=False)
    samples = list(cov._samples(model, cov.resolve_corpus(corpus).path, 10, 16))
    captured = model.run(torch.tensor(samples), capture=[Site("mlp_in", 1), Site("mlp_in", 3)]).captured
    for layer in (1, 3):
        keys = captured[Site("mlp_in", layer)].reshape(-1, captured[Site("mlp_in", layer)].shape[-1]).double()
        torch.testing.assert_close(stats[layer].matrix.double(), keys.T @ keys / keys.shape[0], rtol=1e-4, atol=1e-6)
        assert stats[layer].tokens == 160 and stats[layer].metadata["layer"] == str(layer)


def test_second_moment_cache_round_trip(corpus, monkeypatch):
    model = tiny("random:llama-tiny")
    first = cov.second_moments(model, [2], n_samples=6, sample_tokens=16, corpus=corpus, progress=False)[2]
    assert first.path.is_file() and first.path.suffix == ".safetensors"
    monkeypatch.setattr(cov, "accumulate", lambda *a, **k: pytest.fail("recomputed a cached statistic"))
    again = cov.second_moments(model, [2], n_samples=6, sample_tokens=16, corpus=corpus, progress=False)[2]
    assert torch.equal(first.matrix, again.matrix)
    assert again.metadata["fingerprint"] == key_fingerprint(model, 2) and again.metadata["dtype"] == "float32"


def test_stale_cache_is_recomputed_not_used(corpus):
    from safetensors.torch import save_file

    model = tiny("random:gptj-tiny")
    good = cov.second_moments(model, [1], n_samples=6, sample_tokens=16, corpus=corpus, progress=False)[1]
    stale = {**good.metadata, "format": "0"}
    save_file({"mom2": torch.zeros_like(good.matrix)}, str(good.path), metadata=stale)
    with pytest.warns(UserWarning, match="recomputing stale key statistics"):
        again = cov.second_moments(model, [1], n_samples=6, sample_tokens=16, corpus=corpus, progress=False)[1]
    torch.testing.assert_close(again.matrix, good.matrix)


def test_stats_file_from_another_model_is_an_error(corpus):
    gpt2 = cov.second_moments(tiny("random:gpt2-tiny"), [1], n_samples=4, sample_tokens=16, corpus=corpus, progress=False)[1]
    with pytest.raises(TracekitError, match="another model"):
        cov.second_moments(tiny("random:llama-tiny"), [1], n_samples=4, sample_tokens=16, corpus=corpus,
                           stats_file=gpt2.path, progress=False)
    with pytest.raises(TracekitError, match="other settings"):
        cov.second_moments(tiny("random:gpt2-tiny"), [1], n_samples=5, sample_tokens=16, corpus=corpus,
                           stats_file=gpt2.path, progress=False)


def test_missing_corpus_is_a_one_line_error(tmp_path):
    with pytest.raises(TracekitError, match="corpus file .* does not exist") as err:
        cov.second_moments(tiny("random:gpt2-tiny"), [1], n_samples=4, corpus=str(tmp_path / "nope.txt"))
    assert "\n" not in str(err.value)


def test_corpus_from_the_data_folder(tmp_path, monkeypatch):
    (tmp_path / "no-data").mkdir()
    (tmp_path / "no-data" / "corpus.txt").write_text(TEXT)
    found = cov.resolve_corpus(None)
    assert found is not None and found.path == tmp_path / "no-data" / "corpus.txt"


def test_self_sampled_corpus_warns_and_is_cached(monkeypatch):
    model = tiny("random:gpt2-tiny")
    with pytest.warns(UserWarning, match="sampling .* from the model itself"):
        first = cov.second_moments(model, [0], n_samples=4, sample_tokens=8, corpus="model", progress=False)[0]
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("re-sampled a cached corpus"))
    first.path.unlink()  # statistics gone, corpus still cached
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cov.second_moments(model, [0], n_samples=4, sample_tokens=8, corpus="model", progress=False)[0]
    torch.testing.assert_close(first.matrix, again.matrix)


# ---- fingerprints and templates -------------------------------------------------------------
def test_key_fingerprint_follows_only_the_weights_below_the_key():
    model = tiny("random:llama-tiny")
    base, whole = key_fingerprint(model, 2), weight_fingerprint(model)
    params = dict(model.hf.named_parameters())
    for name, same in [("model.layers.2.mlp.down_proj.weight", True), ("model.layers.3.mlp.up_proj.weight", True),
                       ("model.layers.1.mlp.down_proj.weight", False), ("model.layers.2.mlp.up_proj.weight", False)]:
        old = params[name].detach().clone()
        with torch.no_grad():
            params[name].add_(0.01)
        try:
            assert (key_fingerprint(model, 2) == base) is same, name
            assert weight_fingerprint(model) != whole
        finally:
            with torch.no_grad():
                params[name].copy_(old)
    assert key_fingerprint(model, 2) == base


def test_context_templates_are_seeded_cached_and_well_formed(tmp_path, monkeypatch):
    from tracekit.editing import context

    model = tiny("random:gpt2-tiny")
    context._memory.clear()
    first = context_templates(model, ((3, 2), (5, 3)), seed=1)
    assert len(first) == 6 and first[0] == "{}"
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in first[1:])
    assert first[1].startswith("The") and first[2].startswith("Therefore")
    assert context_templates(model, ((3, 2), (5, 3)), seed=2) != first
    assert list((tmp_path / "cache" / "templates").rglob("*.json"))
    context._memory.clear()
    monkeypatch.setattr(context, "sample_templates", lambda *a: pytest.fail("re-sampled cached templates"))
    assert context_templates(model, ((3, 2), (5, 3)), seed=1) == first


def test_self_sampled_corpus_grows_by_whole_seeded_batches():
    model = tiny("random:llama-tiny")
    with pytest.warns(UserWarning):
        path = cov.self_sampled_corpus(model, 5, 6, progress=False)
    first = path.read_text().splitlines()
    assert len(first) == cov.SELF_CHUNK
    with open(path, "a") as out:
        out.write('{"text": "torn')  # a crash in the middle of a write
    with pytest.warns(UserWarning, match="sampling 32 texts"):
        cov.self_sampled_corpus(model, 40, 6, progress=False)
    grown = path.read_text().splitlines()
    assert len(grown) == 2 * cov.SELF_CHUNK and grown[: cov.SELF_CHUNK] == first


def test_editing_benchmark_smoke_mode(tmp_path):
    """CI runs the editing benchmark's seconds-long smoke version (benchmarks/bench_editing.py)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_editing.py"
    spec = importlib.util.spec_from_file_location("bench_editing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--quiet", "--out-dir", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("editing-*-smoke.json")).read_text())
    assert {"rome", "memit", "rome (whole-forward engine)"} <= set(report["methods"])
    assert report["stats"]["tokens"] == 16 * 32 and report["sweep_estimate"]["edits_per_method"] == 652 * 9
    assert (tmp_path / next(tmp_path.glob("editing-*-smoke.json")).name.replace(".json", ".md")).is_file()
