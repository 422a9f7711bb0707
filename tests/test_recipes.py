"""The recipes end to end on a tiny model: stand-in tracer/editor injected, then the real tracer."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from tracekit.data import locate
from tracekit.errors import TracekitError
from tracekit.store import ResultStore, merge_stores
from tracekit.editing.problems import PointSkipped
from tracekit.studies import spread_layers

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
N_POINTS = 12
SUBJECTS = ["The Eiffel Tower", "The Louvre", "Notre Dame", "The Colosseum", "Big Ben", "The Kremlin"]


def recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data(tmp_path):
    records = [{"case_id": i, "pararel_idx": i, "requested_rewrite": {
        "prompt": "{} is located in the city of", "relation_id": "P131", "subject": SUBJECTS[i % len(SUBJECTS)],
        "target_new": {"str": "Rome", "id": "Q220"}, "target_true": {"str": "Paris", "id": "Q90"}},
        "paraphrase_prompts": ["It rained. Where is it? It is in"], "neighborhood_prompts": ["Paris is in"],
        "attribute_prompts": [], "generation_prompts": []} for i in range(N_POINTS)]
    (tmp_path / "counterfact.json").write_text(json.dumps(records))
    return tmp_path


class FakeTrace:
    def __init__(self, seed, kind, window, n_layers=4):
        peak = seed % n_layers
        self.p_clean, self.p_noise = 0.5, 0.1
        self.effects = [1.0 if layer == peak else 0.1 * window / 3 for layer in range(n_layers)]
        self.kind = kind

    def effect_by_layer(self, reduce="max"):
        return [e / 2 for e in self.effects] if reduce == "last_subject" else self.effects

    def to_json(self):
        return json.dumps({"kind": self.kind, "effects": self.effects})


def fake_trace(model, prompt, subject, target, kind, window, samples, noise, seed):
    assert target == " Paris" and subject in prompt and samples == 2
    return FakeTrace(seed, kind, window)


def fake_zero(model, prompt, subject, target, kind, window):
    return FakeTrace(len(subject), "zero", window)


class FakeEdit:
    applied, undone = True, 0

    def undo(self):
        FakeEdit.undone += 1
        self.applied = False


class FakeResult:
    def __init__(self, scores):
        self.scores, self.edit = scores, FakeEdit()


def fake_edit(model, record, method, problem, layer, hparams, seed):
    assert record.target_true == " Paris" and "{}" in record.prompt and hparams is None
    assert seed == record.case_id  # seed 0 + case id
    if problem == "fact-erasure" and record.case_id % 2:
        raise PointSkipped("p(o_true) < 0.02")
    rewrite = 1 - layer / 4 + record.case_id / 100 + (0.1 if method == "rome" else 0)
    return FakeResult({"rewrite": rewrite, "paraphrase": rewrite / 2, "neighborhood": 0.9, "overall": 0.7,
                       "essence": 0.95, "note": "not a number"})


def common(data, store):
    return ["--model", "random:gpt2-tiny", "--data", str(data), "--no-known-filter", "--store", str(store), "--quiet"]


def test_trace_edit_analyse_with_stand_ins(data, tmp_path, capsys):
    store = tmp_path / "study.sqlite"
    trace = recipe("trace_dataset")
    args = common(data, store) + ["--kinds", "mlp", "zero", "--windows", "3", "--samples", "2"]
    assert trace.main(args, trace_fn=fake_trace, zero_fn=fake_zero) == 0
    assert trace.main(args, trace_fn=None, zero_fn=None) == 0  # resumed: nothing left, the real tracer is not called
    assert "0 computed, 24 already done" in " ".join(capsys.readouterr().out.split())

    edit = recipe("edit_sweep")
    edit_args = common(data, store) + ["--methods", "rome", "ft-1", "--problems", "error-injection", "fact-erasure",
                                       "--default-layer", "1"]
    FakeEdit.undone = 0
    assert edit.main(edit_args, edit_fn=fake_edit) == 0
    total = N_POINTS * 2 * 2 * 4  # points x methods x problems x layers (auto: 0..3)
    with ResultStore(store, readonly=True) as result:
        assert result.count("traces", "ok") == 2 * N_POINTS
        rows = result.frame("edits")
        assert len(rows) == total and FakeEdit.undone == total - N_POINTS * 2 * 4 // 2
        assert rows["status"].str.startswith("skipped").sum() == N_POINTS // 2 * 2 * 4
        edits = result.edits_frame()
        assert "note" not in edits.columns and edits["essence"].eq(0.95).all()
        assert result.manifests()["edit"]["config"]["default_layer"] == 1

    out = tmp_path / "analysis"
    assert recipe("analyse").main(["--store", str(store), "--out", str(out), "--window", "3", "--by-relation",
                                   "--data", str(data)]) == 0
    assert (out / "table3_r2_rewrite_by_relation.csv").exists()
    table1 = pd.read_csv(out / "table1_r2.csv")
    assert table1["R2"].iloc[1] > 0.9  # rewrite is set by the layer in the stand-in
    assert (out / "fig4_rome_error-injection.png").exists() and (out / "robustness_zeroing.csv").exists()
    assert "default layer: 1" in (out / "summary.md").read_text()

    from tracekit.cli import main  # the same analysis as a command of the installed package

    assert main(["analyse", "--store", str(store), "--out", str(tmp_path / "by-command"), "--window", "3",
                 "--permutations", "0"]) == 0
    assert (tmp_path / "by-command" / "table1_r2.csv").exists()

    # One finished step of a sweep: only its problem's edits are analysed.
    one = tmp_path / "erasure-only"
    assert main(["analyse", "--store", str(store), "--out", str(one), "--window", "3", "--permutations", "0",
                 "--problems", "fact-erasure", "--methods", "rome"]) == 0
    table3 = pd.read_csv(one / "table3_r2_rewrite.csv")
    assert set(table3["problem"]) == {"fact-erasure"} and set(table3["method"]) == {"rome"}
    assert "edit results: 24" in (one / "summary.md").read_text()  # rome on the 6 points erasure keeps x 4 layers

    # An edits-only store (one cell rerun under other settings) read with the store holding the traces:
    # its edits, listed first, stand for the same items of the second.
    def shifted_edit(*args, **kwargs):
        result = fake_edit(*args, **kwargs)
        result.scores["rewrite"] += 0.25
        return result

    other = tmp_path / "erasure-rerun.sqlite"
    rerun = common(data, other) + ["--methods", "rome", "--problems", "fact-erasure", "--default-layer", "1"]
    assert edit.main(rerun, edit_fn=shifted_edit) == 0
    both = tmp_path / "erasure-rerun-analysis"
    assert main(["analyse", "--store", str(other), str(store), "--out", str(both), "--window", "3",
                 "--permutations", "0", "--problems", "fact-erasure", "--methods", "rome"]) == 0
    means = [pd.read_csv(folder / "fig7_scores_by_layer.csv").set_index("layer")["rewrite"] for folder in (one, both)]
    assert (means[1] - means[0]).to_list() == pytest.approx([0.25] * 4)
    assert (both / "fig1_effect_by_layer.png").exists()


def test_shards_through_the_recipe_equal_one_run(data, tmp_path):
    trace = recipe("trace_dataset")
    base = ["--kinds", "mlp", "--windows", "3", "--samples", "2"]
    assert trace.main(common(data, tmp_path / "one.sqlite") + base, trace_fn=fake_trace, zero_fn=fake_zero) == 0
    for k in range(3):
        shard_args = common(data, tmp_path / "shard-{shard}.sqlite") + base + ["--shard", f"{k}/3"]
        assert trace.main(shard_args, trace_fn=fake_trace, zero_fn=fake_zero) == 0
    merge_stores(tmp_path / "merged.sqlite", [tmp_path / f"shard-{k}.sqlite" for k in range(3)])
    frames = []
    for name in ("one", "merged"):
        with ResultStore(tmp_path / f"{name}.sqlite", readonly=True) as store:
            frames.append(store.traces_frame().sort_values(["case_id", "layer"]).reset_index(drop=True))
    pd.testing.assert_frame_equal(*frames)


def test_the_real_tracer_fills_the_store(data, tmp_path):
    store = tmp_path / "real.sqlite"
    args = common(data, store) + ["--n", "1", "--kinds", "mlp", "zero", "--windows", "2", "--samples", "2"]
    assert recipe("trace_dataset").main(args) == 0
    with ResultStore(store, readonly=True) as result:
        traces = result.traces_frame(long=False)
        assert len(traces) == 2 and (traces["status"] == "ok").all()
        assert all(len(e) == 4 for e in traces["effect_max"])  # one effect per layer of the 4-layer model
        mlp = traces[traces["kind"] == "mlp"]
        assert mlp["effect_last"].map(len).eq(4).all() and (mlp["p_clean"] > 0).all()
        saved = result.result("traces", {k: traces.iloc[0][k] for k in ("model", "dataset", "case_id", "kind", "window")})
        assert saved["prompt"].endswith("is located in the city of")


def test_bad_input_is_one_line(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRACEKIT_DATA", str(tmp_path / "nowhere"))
    # ../shared/data beside the checkout (or the working directory) may hold CounterFact: look only in tmp_path
    monkeypatch.setattr(locate, "repo_root", lambda: tmp_path / "checkout")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    trace = recipe("trace_dataset")
    assert trace.main(["--model", "random:gpt2-tiny", "--store", str(tmp_path / "s.sqlite"), "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "no counterfact file found; looked at" in out and "Traceback" not in out
    assert trace.main(common(data, tmp_path / "s.sqlite") + ["--n", "99"]) == 2
    assert "asked for 99 counterfact records" in capsys.readouterr().out
    assert trace.main(common(data, tmp_path / "s.sqlite") + ["--windows", "9"]) == 2
    assert "window 9 does not fit" in capsys.readouterr().out
    assert recipe("analyse").main(["--store", str(tmp_path / "none.sqlite")]) == 2
    assert recipe("analyse").main(["--store", str(tmp_path / "s.sqlite"), "--problems", "fact-forcing"]) == 2
    assert "no edits with problem fact-forcing" in " ".join(capsys.readouterr().out.split())
    assert recipe("edit_sweep").main(common(data, tmp_path / "s.sqlite") + ["--layers", "7"], edit_fn=fake_edit) == 2
    assert "outside 0..3" in capsys.readouterr().out
    assert recipe("edit_sweep").main(common(data, tmp_path / "s.sqlite") + ["--score-batch", "0"],
                                     edit_fn=fake_edit) == 2
    assert "--score-batch must be >= 1, got 0" in capsys.readouterr().out


def test_spread_layers():
    assert spread_layers(28, 8, 5) == [0, 4, 5, 8, 12, 15, 19, 23, 27]
    assert spread_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert spread_layers(4, 8, 1) == [0, 1, 2, 3]
    with pytest.raises(TracekitError, match="outside 0..3"):
        spread_layers(4, 8, 4)
