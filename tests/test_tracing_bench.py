"""The tracing benchmark's smoke mode runs in seconds and reports exact agreement (no timing asserts)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tracing_models import BLOCK_OPTIONAL_PACKAGES, one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_tracing.py"


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
        assert case["batched_gflops_per_s"] > 0 and case["naive_gflops_per_s"] > 0
        assert case["batched_fraction_of_measured_peak"] > 0 and case["batched_fraction_of_peak"] is None  # a CPU
    assert "| random:gpt2-tiny (float32) | one prompt |" in out.with_suffix(".md").read_text()


def test_gpu_quick_smoke_runs_without_transformer_lens_nnsight_or_gguf(tmp_path):
    """The GPU machine lacks these packages: the whole quick check (tracing, editing, sweep) must run
    without them. On a CPU it runs the smoke mode: a tiny model, every stage, the same code."""
    script = BLOCK_OPTIONAL_PACKAGES + f"""
import runpy
sys.argv = ['gpu_quick.py', '--smoke', '--profile', '2', '--out-dir', {str(tmp_path)!r}]
runpy.run_path({str(ROOT / "benchmarks" / "gpu_quick.py")!r}, run_name='__main__')
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"device", "load", "tracing", "editing", "sweep"}
    assert not [name for name, stage in stages.items() if "error" in stage or "skipped" in stage]
    assert not any(stages["device"]["optional_packages_present"].values())
    tracing = stages["tracing"]
    assert len(set(tracing["prompt_lengths"])) == len(tracing["prompt_lengths"]) == 4  # distinct lengths
    assert tracing["max_abs_diff"] <= 1e-5 and tracing["cold"]["ratio"] > 0 and tracing["study_estimate_minutes"] > 0
    assert {"rome", "memit", "ft-1"} <= set(stages["editing"]["methods"])
    sweep = stages["sweep"]
    assert set(sweep["methods"]) == {"rome", "memit", "ft-1", "ft-5", "rome, batch 1"}
    assert all(m["complete"] and m["study_sweep_hours"] > 0 for m in sweep["methods"].values())
    assert sweep["methods"]["rome"]["items"] == 4 * len(sweep["layers"]) and sweep["methods"]["rome"]["batch"] == 2
    assert sweep["methods"]["ft-1"]["items"] == 4 * len(sweep["layers"])
    editing = stages["editing"]
    assert editing["factorisations"] and set(editing["factorisations"].values()) == {1}  # once per layer
    assert editing["rome_batched"]["requests"] == 2 and editing["memit_mass"]["requests"] == 2
    assert "GPU quick check" in (tmp_path / "report.md").read_text()
    assert tracing["profile"]["prompts"] == 2 and "aten::" in (tmp_path / "profile.txt").read_text()
