"""Key statistics are never used silently wrong: a changed, NaN or wrong-shaped cache file is
caught on load (checksum, finiteness, shape), a corpus is found where the data is (WikiText
included) or the shipped text is used, the metadata says which, and two processes sampling the
same corpus never append the same batches twice."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny
from tracekit.editing import covariance as cov
from tracekit.errors import TracekitError

SPEC = "random:gpt2-tiny"
TEXT = ("The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.\n\n"
        "Steve Jobs was the founder of Apple. Microsoft was founded by Bill Gates.\n\n") * 30
SHARED_WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRACEKIT_DATA", str(tmp_path / "no-data"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def _stats(corpus, **kwargs):
    return cov.second_moments(tiny(SPEC), [1], n_samples=8, sample_tokens=16, corpus=corpus, progress=False, **kwargs)[1]


def _rewrite(path: Path, change) -> None:
    """Change a statistics file's matrix, keeping its metadata (a corrupted or hand-edited file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    matrix = load_file(str(path))["mom2"]
    save_file({"mom2": change(matrix).contiguous()}, str(path), metadata=metadata)


@pytest.mark.parametrize("change, message", [
    (lambda m: m + 0.01 * torch.eye(m.shape[0]), "checksum"),  # changed bytes
    (lambda m: m.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))), "checksum"),
])
def test_a_changed_cache_file_is_recomputed_not_used(corpus, change, message):
    first = _stats(corpus)
    _rewrite(first.path, change)
    with pytest.warns(UserWarning, match=message):
        again = _stats(corpus)
    assert torch.equal(again.matrix, first.matrix)  # recomputed, not the changed values


@pytest.mark.parametrize("change, message", [
    (lambda m: m + 0.01, "checksum"),
    (lambda m: m[:-1, :-1], r"\(255, 255\) matrix; this model's layer needs \(256, 256\)"),
    (lambda m: m * float("nan"), "NaN or inf"),
])
def test_a_bad_stats_file_given_explicitly_is_a_one_line_error(corpus, tmp_path, change, message):
    first = _stats(corpus)
    path = tmp_path / "given.safetensors"
    matrix = change(first.matrix).contiguous()
    metadata = dict(first.metadata)
    if message != "checksum":  # a consistent file that is wrong anyway: checksum matches, shape or values do not
        metadata["sha256"] = cov.matrix_sha256(matrix)
    save_file({"mom2": matrix}, str(path), metadata=metadata)
    with pytest.raises(TracekitError, match=message) as err:
        _stats(corpus, stats_file=str(path))
    assert "\n" not in str(err.value)


def test_nan_keys_are_refused_not_cached(corpus, monkeypatch):
    monkeypatch.setattr(cov, "accumulate", lambda model, layers, batches, total, dtype, progress:
                        ({layer: torch.full((256, 256), float("nan")) for layer in layers}, 128))
    with pytest.raises(TracekitError, match="NaN or inf"):
        _stats(corpus)
    assert not list(Path(os.environ["TRACEKIT_CACHE"]).rglob("*.safetensors"))


def test_the_metadata_says_which_text_the_statistics_came_from(corpus):
    assert _stats(corpus).source == corpus
    with pytest.warns(UserWarning, match="shipped with tracekit"):
        shipped = _stats(None)
    assert shipped.source == cov.SHIPPED_DESCRIPTION and "Sherlock Holmes" in shipped.source


def test_without_any_corpus_the_shipped_text_is_read_in_seconds(monkeypatch):
    model = tiny(SPEC)
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("sampled text from the model"))
    with pytest.warns(UserWarning, match="shipped with tracekit"):
        stats = cov.second_moments(model, [1], n_samples=64, sample_tokens=64, progress=False)[1]
    assert stats.tokens == 64 * 64 and torch.isfinite(stats.matrix).all()


def test_wikitext_is_found_in_its_folder(tmp_path):
    folder = tmp_path / "no-data" / "wikitext"
    folder.mkdir(parents=True)
    (folder / "wikitext-2-raw-v1.test.raw").write_text(" = Title = \n \n A well @-@ known city of 1 @,@ 000 people . \n \n")
    found = cov.resolve_corpus(None)
    assert found.path == folder / "wikitext-2-raw-v1.test.raw"
    samples = list(cov._samples(tiny(SPEC), found.path, 1, 4))
    text = tiny(SPEC).tokenizer.decode([t for s in samples for t in s])
    assert "@" not in text


@pytest.mark.skipif(not (SHARED_WIKITEXT / "wikitext-2-raw-v1.test.raw").is_file(),
                    reason="../shared/data/wikitext is not beside this checkout")
def test_the_shared_wikitext_is_found(monkeypatch):
    monkeypatch.delenv("TRACEKIT_DATA")
    found = cov.resolve_corpus(None)
    assert found is not None and found.path.parent.name == "wikitext", found


SAMPLER = """
import sys, warnings
warnings.simplefilter("ignore")
import tracekit
from tracekit.editing import covariance as cov
model = tracekit.load_model("random:llama-tiny", device="cpu")
print(cov.self_sampled_corpus(model, 40, 6, progress=False))
"""


def test_two_processes_sampling_one_corpus_write_each_batch_once(tmp_path):
    env = {**os.environ, "TRACEKIT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", SAMPLER], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert len(paths) == 1 and all(p.returncode == 0 for p in procs)
    lines = Path(paths.pop()).read_text().splitlines()
    assert len(lines) == 2 * cov.SELF_CHUNK  # without the lock: up to 4 batches, the same two twice
    texts = [json.loads(line)["text"] for line in lines]
    assert texts[: cov.SELF_CHUNK] != texts[cov.SELF_CHUNK:]
