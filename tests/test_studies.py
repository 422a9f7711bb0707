"""The studies floor without Ray: its place above store/tracing/editing, batching, the CLI."""

import ast
from pathlib import Path

from tracekit.store import SweepItem
from tracekit.studies.ray_executor import _batches

PACKAGE = Path(__file__).resolve().parents[1] / "tracekit"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_lower_floor_imports_the_studies():
    """Studies drive the store, tracing and editing; only the command line (and analysis) sit above them."""
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("studies", "cli", "analysis", "__main__.py"):
            continue
        upward = {m for m in imported_modules(path) if m.startswith("tracekit.studies")}
        assert not upward, f"{relative} imports {upward}: the studies sit above it"


def test_batches_keep_points_together_and_prepared_items_apart():
    items = [SweepItem({"case_id": c, "method": m}) for c in (3, 1, 2) for m in ("rome", "ft-1", "rome")]
    needs = [item.key["method"] == "rome" for item in items]
    batches = _batches(items, needs, lambda key: key["case_id"], points_per_batch=1)
    assert [([i for i, _ in b.entries], b.needs_prepare) for b in batches] == [
        ([1], False), ([0, 2], True), ([4], False), ([3, 5], True), ([7], False), ([6, 8], True)]
    two = _batches(items, [False] * 9, lambda key: key["case_id"], points_per_batch=2)
    assert [[i for i, _ in b.entries] for b in two] == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]


def test_the_sweeps_are_commands_of_the_installed_package(capsys):
    from tracekit.cli import main

    for command in ("trace-dataset", "edit-sweep"):
        try:
            main([command, "--help"])
        except SystemExit as exit:
            assert exit.code == 0
        assert "--executor {local,ray}" in capsys.readouterr().out


def test_a_batched_trace_study_stores_what_an_item_by_item_one_stores(tmp_path, monkeypatch):
    """TraceTask(batch=3): points traced together by trace_many, each with its own seed."""
    import json

    import pandas as pd
    import pytest

    import tracekit.tracing
    from conftest import tiny
    from tracekit.data.loaders import load_dataset
    from tracekit.store import ResultStore
    from tracekit.studies import trace_study

    model, records = tiny("random:gpt2-tiny"), load_dataset("worldfacts", None, 4)
    calls, original = [], tracekit.tracing.trace_many
    monkeypatch.setattr(tracekit.tracing, "trace_many", lambda m, rs, **k: calls.append(len(rs)) or original(m, rs, **k))
    frames = {}
    for batch in (1, 3):
        with ResultStore(tmp_path / f"b{batch}.sqlite") as store:
            report = trace_study(model, records, store, kinds=("mlp", "zero"), windows=(2,), samples=3, progress=False,
                                 batch=batch)
            assert report.computed == 8 and not report.failed
            frames[batch] = store.frame("traces").sort_values(["case_id", "kind"]).reset_index(drop=True)
    assert calls and max(calls) > 1  # the batched study traced several points per call
    one, many = frames[1], frames[3]
    pd.testing.assert_frame_equal(one[["case_id", "kind", "window"]], many[["case_id", "kind", "window"]])
    pd.testing.assert_series_equal(one["p_clean"], many["p_clean"], rtol=1e-5)
    pd.testing.assert_series_equal(one["p_noise"], many["p_noise"], rtol=1e-5)
    for a, b in zip(one["effect_max"], many["effect_max"]):
        assert json.loads(b) == pytest.approx(json.loads(a), rel=1e-4, abs=1e-5)


def test_default_batches_go_by_the_device_the_items_run_on():
    """1 on a CPU; 16 where the workers hold the model on GPUs (a Ray pool's card says so)."""
    import argparse
    from types import SimpleNamespace

    from conftest import tiny
    from tracekit.cli.studies import edit_batch, trace_batch
    from tracekit.studies.executors import ModelCard

    args = argparse.Namespace(batch=None, samples=10)
    local = tiny("random:gpt2-tiny")
    assert ModelCard.of(local).device_type == "cpu"
    assert edit_batch(args, local) == 1 and trace_batch(args, local) == 1
    gpu_pool = SimpleNamespace(device_type="cuda")  # a RemoteModel: no device attribute, the workers' type
    assert edit_batch(args, gpu_pool) == 16 and trace_batch(args, gpu_pool) == 16
    assert edit_batch(argparse.Namespace(batch=3, samples=10), gpu_pool) == 3


def test_an_edit_study_under_tracekits_noise_convention_records_it(tmp_path):
    """--convention tracekit: every item edited and scored under tracekit's single noise draw (the
    scores of ``edit`` with that convention, batched or not); the store's settings say so, and a
    study under the default convention keeps the settings it always had (stores made before resume)."""
    import pytest

    from conftest import tiny
    from tracekit import TracekitError
    from tracekit.data import FactRecord
    from tracekit.editing.api import edit
    from tracekit.editing.finetune import FTHyperParams
    from tracekit.editing.metrics import MetricsConfig
    from tracekit.store import ResultStore
    from tracekit.studies import EditTask, LocalExecutor, edit_study

    model = tiny("random:gptj-tiny")
    records = [FactRecord(case_id=i, prompt="The mother tongue of {} is", subject=s, target_true=" French",
                          target_new=" English", paraphrase_prompts=(f"She spoke. The mother tongue of {s} is",),
                          neighborhood_prompts=("The capital of France is",))
               for i, s in enumerate(["Danielle Darrieux", "Thomas Joannes Stieltjes"])]
    hp, metrics = FTHyperParams(lr=5e-2, norm_constraint=5e-2, stop_loss=None), MetricsConfig(essence=False)
    stored = {}
    for batch in (1, 2):
        task = EditTask(methods=("ft-1",), problems=("fact-forcing",), layers=(1,), hparams=hp, metrics=metrics,
                        batch=batch, convention="tracekit")
        assert task.config("m")["convention"] == "tracekit"
        store = ResultStore(tmp_path / f"b{batch}.sqlite")
        assert not LocalExecutor(model).run(task, store, task.items("m", records), progress=False).failed
        stored[batch] = store.edits_frame().set_index("case_id")["rewrite"]
    for record in records:
        alone = edit(model, record, method="ft-1", problem="fact-forcing", layer=1, hparams=hp, metrics=metrics,
                     seed=record.case_id, convention="tracekit")
        paper = edit(model, record, method="ft-1", problem="fact-forcing", layer=1, hparams=hp, metrics=metrics,
                     seed=record.case_id)
        for batch in (1, 2):
            assert stored[batch][record.case_id] == pytest.approx(alone.scores.scores["rewrite"], rel=1e-4, abs=1e-6)
        assert paper.scores.scores["rewrite"] != pytest.approx(alone.scores.scores["rewrite"], rel=1e-3)
    assert "convention" not in EditTask(layers=(1,)).config("m")
    with ResultStore(tmp_path / "bad.sqlite") as store, pytest.raises(TracekitError, match="unknown convention 'ours'"):
        edit_study(model, records, store, methods=("ft-1",), layers=(1,), convention="ours", progress=False)
