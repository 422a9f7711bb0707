"""The main job from a cold cache: ROME's key statistics come from a text (a corpus in the data
folders, else the text shipped with tracekit), never from minutes of sampling, and the demo says
which. (Its wall time on the bundled model is in the README; timings are not asserted here.)"""

import json

import pytest

from tracekit.cli import main
from tracekit.editing import covariance


def test_the_demo_runs_rome_on_a_tiny_model_from_a_cold_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path / "cold-cache"))
    monkeypatch.setenv("TRACEKIT_DATA", str(tmp_path / "no-data"))
    monkeypatch.setattr(covariance, "self_sampled_corpus",
                        lambda *a, **k: pytest.fail("sampled a corpus from the model"))
    with pytest.warns(UserWarning, match="shipped with tracekit"):
        code = main(["demo", "--model", "random:gpt2-tiny", "--samples", "2", "--out", str(tmp_path / "out")])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert "window 4" in out  # the default window 10, cut to the model's 4 layers
    assert "key statistics: the text shipped with tracekit (The Adventures of Sherlock Holmes" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["edit"]["key_statistics"].endswith("64 samples of 128 tokens")
    assert list((tmp_path / "cold-cache" / "stats").rglob("*.safetensors"))
