"""The tracing benchmark's smoke mode runs in seconds and reports exact agreement (no timing asserts)."""

import importlib.util
import json
from pathlib import Path

from tracing_models import one_thread  # noqa: F401

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tracing.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_tracing", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_work_bound_matches_a_hand_count():
    bench = _bench()
    fm = {"block_params": 10, "d_model": 1, "vocab": 5, "n_layers": 2}
    naive, minimal = bench.work(fm, T=2, window=1, samples=1)
    layer = lambda first, end: 2 * 10 * (end - first) + 4 * sum(p + 1 for p in range(first, end))  # noqa: E731
    full = 2 * layer(0, 2)  # two layers over both positions
    assert naive == (2 * 2 + 1) * 2 * (full + 2 * 10)  # (T x L cells + 1) passes x 2 rows
    # one clean + one corrupted run; cells: t=0 from layer 0 / 1, t=1 from layer 0 / 1
    assert minimal == 2 * (full + 10) + (2 * layer(0, 2) + 10) + (layer(0, 2) + 10) + (2 * layer(1, 2) + 10) + (
        layer(1, 2) + 10)


def test_smoke_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "tracing.json"
    assert _bench().main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (model,) = report["models"]
    assert model["model"] == "random:gpt2-tiny" and model["engine"] == "fast"
    for case in model["cases"]:
        assert case["max_abs_diff"] <= 1e-5
        assert case["work_bound"] > 1.5
        assert case["efficiency"] == case["time_ratio"] / case["work_bound"]
    assert "| random:gpt2-tiny (float32) | one prompt |" in out.with_suffix(".md").read_text()
