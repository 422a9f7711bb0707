"""The result store: round trip to DataFrames, manifest checks, resume, shards and merging."""

import re
import sqlite3

import pandas as pd
import pytest

from tracekit import TracekitError
from tracekit.store import ResultStore, Shard, SweepItem, merge_stores, run_sweep
from tracekit.store.manifest import code_version


def edit_items(n_points=30, layers=(0, 2, 5)):
    return [SweepItem(dict(model="m", dataset="cf", case_id=c, method="rome", problem="error-injection", layer=layer))
            for c in range(n_points) for layer in layers]


def score(item):
    """A deterministic stand-in for an edit: rewrite falls with the layer."""
    c, layer = item.key["case_id"], item.key["layer"]
    return {"status": "ok", "scores": {"rewrite": 1 - layer / 10 + c / 1000, "paraphrase": 0.5}}


def comparable(df):
    return df.sort_values(["case_id", "layer"]).reset_index(drop=True)


def test_round_trip_to_dataframes(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert store.add_trace(model="m", dataset="cf", case_id=3, kind="mlp", window=5, p_clean=0.7, p_noise=0.1,
                               effect_max=[0.0, 0.25, 1.0], effect_last=[0.0, 0.5, 0.75], result='{"x": 1}')
        assert not store.add_trace(model="m", dataset="cf", case_id=3, kind="mlp", window=5, p_clean=0.1,
                                   p_noise=0.0, effect_max=[9, 9, 9])  # same key: ignored, first result kept
        store.add_trace(model="m", dataset="cf", case_id=4, kind="zero", window=5, p_clean=0.5, p_noise=None,
                        effect_max=[0.1, 0.2, 0.3])
        store.add_edit(model="m", dataset="cf", case_id=3, method="rome", problem="error-injection", layer=1,
                       scores={"rewrite": 0.9, "neighborhood": 0.8, "efficacy": True})
        store.add_edit(model="m", dataset="cf", case_id=4, method="rome", problem="fact-erasure", layer=1,
                       scores={}, status="skipped: p(o_true) < 0.02")
    with ResultStore(tmp_path / "s.sqlite", readonly=True) as store:
        traces = store.traces_frame()
        assert len(traces) == 6
        mlp = traces[traces["kind"] == "mlp"]
        assert mlp["layer"].tolist() == [0, 1, 2]
        assert mlp["effect"].tolist() == [0.0, 0.25, 1.0] and mlp["effect_last"].tolist() == [0.0, 0.5, 0.75]
        assert mlp["p_clean"].tolist() == [0.7] * 3
        assert traces[traces["kind"] == "zero"]["effect_last"].isna().all()
        wide = store.traces_frame(long=False)
        assert wide.set_index("case_id").loc[3, "effect_max"] == [0.0, 0.25, 1.0]
        edits = store.edits_frame()
        assert len(edits) == 1 and edits.loc[0, "rewrite"] == 0.9 and edits.loc[0, "efficacy"] == 1
        assert len(store.edits_frame(only_ok=False)) == 2
        assert store.result("traces", dict(model="m", dataset="cf", case_id=3, kind="mlp", window=5)) == {"x": 1}
        with pytest.raises(sqlite3.OperationalError):  # read-only really is read-only
            store.conn.execute("DELETE FROM edits")
    with pytest.raises(TracekitError, match="no result store at"):
        ResultStore(tmp_path / "missing.sqlite", readonly=True)


def test_manifest_records_and_guards_settings(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        digest = store.begin("edit", {"model": "m#1", "hparams": None, "seed": 0}, seed=0)
        assert store.begin("edit", {"seed": 0, "hparams": None, "model": "m#1"}, seed=0) == digest  # key order
        manifest = store.manifests()["edit"]
        assert manifest["config_hash"] == digest and manifest["seed"] == 0
        assert {"python", "torch", "pandas"} <= set(manifest["versions"])
        with pytest.raises(TracekitError, match=r"other settings \(model, seed differ\)"):
            store.begin("edit", {"model": "m#2", "hparams": None, "seed": 1}, seed=1)
        store.begin("trace", {"samples": 10}, seed=0)  # another sweep has its own settings
        assert set(store.manifests()) == {"edit", "trace"}
        # every start is logged (the refused one is not), with the command and the code that ran
        runs = store.runs()
        assert [r["sweep"] for r in runs] == ["edit", "edit", "trace"]
        assert runs[0]["config_hash"] == digest and runs[0]["started"] <= runs[1]["started"] <= runs[2]["started"]
        assert runs[0]["command"] and {"python", "torch"} <= set(runs[0]["versions"])
        assert runs[0]["code"] == code_version()


def test_code_version_names_the_checkout():
    version = code_version()
    if version is None:
        pytest.skip("tracekit is not running from a git checkout")
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", version)


def test_a_store_from_before_the_run_log_reads_and_merges(tmp_path):
    old = tmp_path / "old.sqlite"
    with ResultStore(old) as store:
        store.begin("edit", {"model": "m"}, 0)
    with sqlite3.connect(old) as conn:
        conn.execute("DROP TABLE runs")
    with ResultStore(old, readonly=True) as store:
        assert store.runs() == [] and "edit" in store.manifests()
    new = tmp_path / "new.sqlite"
    with ResultStore(new) as store:
        store.begin("edit", {"model": "m"}, 0)
    merge_stores(tmp_path / "merged.sqlite", [old, new])
    merge_stores(tmp_path / "merged.sqlite", [new])  # a run already there is not logged twice
    with ResultStore(tmp_path / "merged.sqlite", readonly=True) as merged:
        assert len(merged.runs()) == 1 and merged.manifests()["edit"]["config_hash"]


def test_rerun_skips_what_is_done(tmp_path):
    calls = []

    def work(item):
        calls.append(item.key["case_id"])
        return score(item)

    with ResultStore(tmp_path / "s.sqlite") as store:
        first = run_sweep(store, "edits", edit_items(5)[:7], work=work, progress=False)
        assert (first.computed, first.already_done) == (7, 0)
        second = run_sweep(store, "edits", edit_items(5), work=work, progress=False)
        assert (second.computed, second.already_done) == (8, 7)
        assert len(calls) == 15 and store.count("edits") == 15


def test_failures_are_stored_and_can_be_retried(tmp_path):
    def work(item):
        if item.key["case_id"] == 2:
            raise TracekitError("subject not in prompt")
        if item.key["case_id"] == 3:
            return {"status": "skipped: does not qualify"}
        return score(item)

    with ResultStore(tmp_path / "s.sqlite") as store:
        report = run_sweep(store, "edits", edit_items(5, layers=(0,)), work=work, progress=False)
        assert (report.computed, report.skipped, len(report.failed)) == (3, 1, 1)
        assert report.failed[0][0]["case_id"] == 2 and "subject not in prompt" in report.failed[0][1]
        statuses = store.frame("edits").set_index("case_id")["status"]
        assert statuses[2] == "failed: subject not in prompt" and statuses[3] == "skipped: does not qualify"
        assert run_sweep(store, "edits", edit_items(5, layers=(0,)), work=work, progress=False).computed == 0
        assert store.delete_failed("edits") == 1  # skipped rows stay: they are answers, not errors
        again = run_sweep(store, "edits", edit_items(5, layers=(0,)), work=score, progress=False)
        assert again.computed == 1 and store.count("edits", "ok") == 4


def test_a_sweep_where_everything_fails_stops_without_storing(tmp_path):
    def broken(item):
        raise TracekitError("no rome presets for this model")

    with ResultStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(TracekitError, match="the first 5 item.s. all failed.*no rome presets"):
            run_sweep(store, "edits", edit_items(10), work=broken, progress=False)
        with pytest.raises(TracekitError, match="the first 2 item.s. all failed"):
            run_sweep(store, "edits", edit_items(2, layers=(0,)), work=broken, progress=False)
        assert store.count("edits") == 0


def test_batched_work_names_the_failing_item(tmp_path):
    def work_many(batch):
        for item in batch:
            if item.key["case_id"] == 3:
                raise TracekitError("bad point")
            yield item, score(item)

    with ResultStore(tmp_path / "s.sqlite") as store:
        report = run_sweep(store, "edits", edit_items(8, layers=(1,)), work_many=work_many, batch_size=4, progress=False)
        assert report.computed == 7 and [k["case_id"] for k, _ in report.failed] == [3]
        assert store.count("edits") == 8


def test_shards_partition_the_points():
    shards = [Shard(k, 4) for k in range(4)]
    owners = [[s for s in shards if s.owns(case)] for case in range(200)]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(o[0] is s for o in owners) for s in shards]
    assert min(sizes) > 30  # a hash spreads points about evenly
    assert Shard.parse("2/4") == Shard(2, 4) and Shard.parse(None) is None
    for bad in ("4/4", "x", "1/0", "-1/3"):
        with pytest.raises(TracekitError, match="shard"):
            Shard.parse(bad)


def test_sharded_runs_merged_equal_an_unsharded_run(tmp_path):
    items = edit_items(30)
    with ResultStore(tmp_path / "all.sqlite") as store:
        store.begin("edit", {"model": "m"}, 0)
        run_sweep(store, "edits", items, work=score, progress=False)
        unsharded = store.edits_frame()
    parts = []
    for k in range(3):
        with ResultStore(tmp_path / f"shard-{k}.sqlite") as store:
            store.begin("edit", {"model": "m"}, 0)
            report = run_sweep(store, "edits", items, work=score, shard=Shard(k, 3), progress=False)
            assert report.owned % 3 == 0  # every layer of a point stays in one shard
            parts.append(tmp_path / f"shard-{k}.sqlite")
    report = merge_stores(tmp_path / "merged.sqlite", parts)
    assert report.added["edits"] == 90 and report.duplicates["edits"] == 0
    with ResultStore(tmp_path / "merged.sqlite", readonly=True) as merged:
        pd.testing.assert_frame_equal(comparable(merged.edits_frame()), comparable(unsharded))
        assert merged.manifests()["edit"]["config_hash"]
    again = merge_stores(tmp_path / "merged.sqlite", parts[:2])  # merging twice adds nothing
    assert again.added["edits"] == 0 and again.duplicates["edits"] > 0


def test_merge_refuses_conflicts_and_other_settings(tmp_path):
    def make(name, rewrite, config):
        with ResultStore(tmp_path / name) as store:
            store.begin("edit", config, 0)
            store.add_edit(model="m", dataset="cf", case_id=1, method="rome", problem="error-injection", layer=0,
                           scores={"rewrite": rewrite})
        return tmp_path / name

    a, b, c = make("a.sqlite", 0.5, {"x": 1}), make("b.sqlite", 0.6, {"x": 1}), make("c.sqlite", 0.5, {"x": 2})
    with pytest.raises(TracekitError, match=r"cannot merge: edits .*'case_id': 1.* differs between"):
        merge_stores(tmp_path / "out.sqlite", [a, b])
    assert not (tmp_path / "out.sqlite").exists()  # nothing written, not even an empty store
    with pytest.raises(TracekitError, match="sweep 'edit' was run with other settings"):
        merge_stores(tmp_path / "out.sqlite", [a, c])
    with pytest.raises(TracekitError, match="no result store at"):
        merge_stores(tmp_path / "out.sqlite", [tmp_path / "nope.sqlite"])


def test_store_cli_show_merge_export(tmp_path, capsys):
    from tracekit.cli import main

    with ResultStore(tmp_path / "s0.sqlite") as store:
        run_sweep(store, "edits", edit_items(4), work=score, shard=Shard(0, 2), progress=False)
    with ResultStore(tmp_path / "s1.sqlite") as store:
        run_sweep(store, "edits", edit_items(4), work=score, shard=Shard(1, 2), progress=False)
    assert main(["store", "merge", str(tmp_path / "m.sqlite"), str(tmp_path / "s0.sqlite"),
                 str(tmp_path / "s1.sqlite")]) == 0
    assert main(["store", "show", str(tmp_path / "m.sqlite")]) == 0
    assert "error-injection" in capsys.readouterr().out
    assert main(["store", "export", str(tmp_path / "m.sqlite"), "--out", str(tmp_path / "csv")]) == 0
    assert len(pd.read_csv(tmp_path / "csv" / "edits.csv")) == 12
    assert main(["store", "show", str(tmp_path / "none.sqlite")]) == 2
