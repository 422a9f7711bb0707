"""Studies on a Ray cluster (a local Ray instance with 2 CPUs, tiny random models).

Shown here: a Ray sweep stores exactly the items and values of a local sweep; a worker killed
mid-run (SIGKILL) and a driver killed mid-run lose and duplicate nothing; key statistics are
computed once per layer per sweep, not once per worker (counted in every process).
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from conftest import tiny  # noqa: E402
from tracekit.data.loaders import load_dataset  # noqa: E402
from tracekit.editing.finetune import FTHyperParams  # noqa: E402
from tracekit.editing.hparams import ROMEHyperParams  # noqa: E402
from tracekit.editing.metrics import MetricsConfig  # noqa: E402
from tracekit.store import ResultStore  # noqa: E402
from tracekit.studies import ModelSource, RayExecutor, edit_study, trace_study  # noqa: E402

SPEC = "random:gpt2-tiny"
N_POINTS, LAYERS = 4, (1, 2)
CORPUS = ("The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.\n"
          "Steve Jobs was the founder of Apple. Microsoft was founded by Bill Gates.\n\n") * 60
METRICS = MetricsConfig(essence=False)  # the essence score samples texts: slow, and tested elsewhere
COUNT_LOG = "TRACEKIT_TEST_STATISTICS_LOG"


def hparams(corpus: str, n_samples: int = 40) -> dict:
    rome = ROMEHyperParams(corpus=corpus, mom2_n_samples=n_samples, mom2_sample_tokens=32, mom2_ridge=1e-2,
                           context_lengths=((3, 2),), v_num_grad_steps=4, v_weight_decay=0.0, clamp_norm_factor=1e3)
    return {"rome": rome, "ft-1": FTHyperParams(steps=3)}


def count_statistics_passes():
    """Runs in every Ray worker process: log each pass over the corpus and the layers it fills."""
    from tracekit.editing import covariance

    original = covariance.accumulate

    def counted(model, layers, *args, **kwargs):
        with open(os.environ[COUNT_LOG], "a") as log:
            log.write(json.dumps({"pid": os.getpid(), "layers": list(layers)}) + "\n")
        return original(model, layers, *args, **kwargs)

    covariance.accumulate = counted


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    (root / "corpus.txt").write_text(CORPUS)
    log = root / "statistics.log"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels by value
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": count_statistics_passes, "env_vars": {COUNT_LOG: str(log)}})
    yield root
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    """Two workers, each with its own cache folder (as on two machines without a shared filesystem)."""
    with RayExecutor(ModelSource(SPEC, device="cpu"), workers=2, cpus_per_worker=0.5,
                     worker_env={"TRACEKIT_CACHE": str(cluster / "worker-{worker}")}) as executor:
        yield executor


@pytest.fixture(scope="module")
def records():
    return load_dataset("worldfacts", None, N_POINTS)


def sweep(model, store, records, corpus, **kw):
    trace_study(model, records, store, kinds=("mlp", "zero"), windows=(2,), samples=2, progress=False)
    return edit_study(model, records, store, methods=("rome", "ft-1"), layers=LAYERS, hparams=hparams(corpus),
                      metrics=METRICS, progress=False, **kw)


@pytest.fixture(scope="module")
def local(cluster, records, tmp_path_factory):
    """The same sweep in this process: the reference."""
    old = os.environ.get("TRACEKIT_CACHE")
    os.environ["TRACEKIT_CACHE"] = str(cluster / "driver")
    try:
        with ResultStore(cluster / "local.sqlite") as store:
            sweep(tiny(SPEC), store, records, str(cluster / "corpus.txt"))
    finally:
        if old is None:
            del os.environ["TRACEKIT_CACHE"]
        else:
            os.environ["TRACEKIT_CACHE"] = old
    return cluster / "local.sqlite"


def frames(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    with ResultStore(path, readonly=True) as store:
        traces = store.frame("traces").drop(columns=["created"])
        edits = store.edits_frame(only_ok=False)
    traces = traces.sort_values(["case_id", "kind"]).reset_index(drop=True)
    edits = edits.sort_values(["case_id", "method", "layer"]).reset_index(drop=True)
    return traces, edits


def assert_same_results(path, reference):
    (traces, edits), (want_traces, want_edits) = frames(path), frames(reference)
    assert len(want_traces) == 2 * N_POINTS and len(want_edits) == N_POINTS * 2 * len(LAYERS)
    assert (want_edits["status"] == "ok").all()
    keys = ["model", "dataset", "case_id", "kind", "window"]
    pd.testing.assert_frame_equal(traces[keys], want_traces[keys])  # the same items, each once
    pd.testing.assert_frame_equal(edits[["case_id", "method", "layer"]], want_edits[["case_id", "method", "layer"]])
    for column in ("p_clean", "p_noise"):
        pd.testing.assert_series_equal(traces[column], want_traces[column], rtol=1e-5)
    for got, want in zip(traces["effect_max"].map(json.loads), want_traces["effect_max"].map(json.loads)):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    scores = [c for c in want_edits.columns if c not in ("model", "dataset", "case_id", "method", "problem", "layer",
                                                         "status")]
    assert "rewrite" in scores and "neighborhood" in scores
    pd.testing.assert_frame_equal(edits[scores], want_edits[scores], rtol=1e-4, atol=1e-6)


def test_a_ray_sweep_stores_what_a_local_sweep_stores(pool, local, records, cluster, tmp_path):
    report = sweep(pool.model, ResultStore(tmp_path / "ray.sqlite"), records, str(cluster / "corpus.txt"))
    assert report.computed == N_POINTS * 2 * len(LAYERS) and not report.failed
    assert pool.stats["items"] == 2 * N_POINTS + N_POINTS * 2 * len(LAYERS)  # every item computed once
    assert_same_results(tmp_path / "ray.sqlite", local)


def test_a_batched_ray_sweep_stores_what_a_local_sweep_stores(pool, local, records, cluster, tmp_path):
    """EditTask(batch=2): each worker gets two points per batch and edits them together."""
    report = sweep(pool.model, ResultStore(tmp_path / "ray.sqlite"), records, str(cluster / "corpus.txt"), batch=2)
    assert report.computed == N_POINTS * 2 * len(LAYERS) and not report.failed
    assert_same_results(tmp_path / "ray.sqlite", local)


def test_a_worker_runs_a_batch_together_and_redoes_what_fails_one_by_one():
    from tracekit.studies.ray_worker import StudyWorker

    class Task:
        items_per_call, calls = 2, []

        def session(self, model):
            import contextlib
            return contextlib.nullcontext()

        def compute_many(self, model, items):
            self.calls.append(("many", [i["n"] for i in items]))
            yield items[0], {"together": items[0]["n"]}
            raise RuntimeError("the second point broke")

        def compute(self, model, item):
            self.calls.append(("one", item["n"]))
            return {"alone": item["n"]}

    worker = StudyWorker.__new__(StudyWorker)
    worker.model, worker.task_id, worker._reload = object(), "t", lambda: None
    import contextlib
    worker.session = contextlib.ExitStack()
    got = [(index, values) for index, values, _ in worker.run("t", Task(), [(5, {"n": 0}), (6, {"n": 1})])]
    assert got == [(5, {"together": 0}), (6, {"alone": 1})]
    assert Task.calls == [("many", [0, 1]), ("one", 1)]


def test_key_statistics_are_computed_once_per_layer_not_per_worker(pool, records, cluster, tmp_path):
    log = cluster / "statistics.log"
    log.write_text("")
    shipped = pool.stats["files shipped"]
    with ResultStore(tmp_path / "s.sqlite") as store:  # 24 samples: statistics no earlier test computed
        report = edit_study(pool.model, records, store, methods=("rome",), layers=(0, 1, 3), metrics=METRICS,
                            hparams=hparams(str(cluster / "corpus.txt"), n_samples=24)["rome"], progress=False)
        rows = store.frame("edits").shape[0]
    assert report.computed == rows == N_POINTS * 3
    passes = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(passes) == 1 and passes[0]["layers"] == [0, 1, 3]  # one pass, every layer once, in one process
    assert pool.stats["files shipped"] - shipped == 3  # the other worker read them from the object store


def stored(path, table="edits") -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(pool, local, records, cluster, tmp_path):
    path, result = tmp_path / "killed.sqlite", {}
    with ResultStore(path) as store:
        trace_study(pool.model, records, store, kinds=("mlp", "zero"), windows=(2,), samples=2, progress=False)

    def run():  # the store is opened in the thread that writes it (sqlite3 connections stay in one thread)
        with ResultStore(path) as store:
            result["report"] = edit_study(pool.model, records, store, methods=("rome", "ft-1"), layers=LAYERS,
                                          hparams=hparams(str(cluster / "corpus.txt")), metrics=METRICS,
                                          progress=False)

    victim = pool.worker_pids()[min(pool.worker_pids())]
    driver = threading.Thread(target=run)
    driver.start()
    deadline = time.time() + 90
    while stored(path) < 2 and time.time() < deadline and driver.is_alive():
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    at_kill = stored(path)
    driver.join(120)
    report = result["report"]
    assert at_kill < N_POINTS * 2 * len(LAYERS)  # killed mid-run
    assert report.computed == N_POINTS * 2 * len(LAYERS) and report.retried >= 1 and not report.failed
    assert victim not in pool.worker_pids().values() and len(pool.workers) == 2  # replaced
    assert_same_results(path, local)


def test_a_killed_driver_resumes_from_the_store(pool, tmp_path):
    """The recipe as a user runs it, as its own process on the cluster: SIGKILL it, then resume."""
    path, total = tmp_path / "driver.sqlite", 12 * 4
    args = ["trace-dataset", "--model", SPEC, "--device", "cpu", "--dataset", "worldfacts", "--n", "12",
            "--no-known-filter", "--kinds", "mlp", "zero", "--windows", "1", "2", "--samples", "2", "--store", str(path),
            "--quiet", "--executor", "ray", "--address", ray.get_runtime_context().gcs_address, "--workers", "1",
            "--cpus-per-worker", "0.5"]
    first = subprocess.Popen([sys.executable, "-m", "tracekit", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while stored(path, "traces") < 4 and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    first.kill()
    assert first.wait() == -signal.SIGKILL
    at_kill = stored(path, "traces")
    assert 4 <= at_kill < total  # killed mid-run, with results already stored

    with ResultStore(path) as store:  # the rerun (on this module's workers: the same settings, another driver)
        report = trace_study(pool.model, load_dataset("worldfacts", None, 12), store, kinds=("mlp", "zero"),
                             windows=(1, 2), samples=2, progress=False)
        traces = store.traces_frame(long=False)
    assert (report.already_done, report.computed) == (at_kill, total - at_kill)
    assert len(traces) == total and (traces["status"] == "ok").all()
    assert not traces.duplicated(["case_id", "kind", "window"]).any()
    assert sorted(set(traces["case_id"])) == list(range(12))


class Scored:
    def __init__(self, rewrite):
        self.scores, self.edit = {"rewrite": rewrite}, None


def flaky_edit(model, record, method, problem, layer, hparams, seed):
    """A stand-in editor (shipped to the workers by value) that always breaks on point 1."""
    if record.case_id == 1:
        raise RuntimeError("CUDA out of memory (pretend)")
    return Scored(layer / 10)


def test_an_item_that_keeps_failing_is_stored_as_failed_not_retried_forever(pool, records, tmp_path):
    with ResultStore(tmp_path / "f.sqlite") as store:
        report = edit_study(pool.model, records, store, methods=("ft-1",), layers=LAYERS, edit_fn=flaky_edit,
                            progress=False)
        rows = store.frame("edits").set_index(["case_id", "layer"])["status"]
    assert report.computed == (N_POINTS - 1) * len(LAYERS) and len(report.failed) == len(LAYERS)
    assert report.retried == len(LAYERS) * (pool.max_attempts - 1)  # tried max_attempts times, then recorded
    for layer in LAYERS:
        assert rows[(1, layer)].startswith("failed: RuntimeError: CUDA out of memory (pretend)")
        assert rows[(1, layer)].endswith(f"({pool.max_attempts} attempts)")
    assert (rows.drop(index=1, level="case_id") == "ok").all()


def test_the_driver_asks_a_worker_to_generate(pool, records):
    prompts = [r.text for r in records]
    assert pool.model.generate(prompts, max_new_tokens=4) == tiny(SPEC).generate(prompts, max_new_tokens=4)


def test_a_pool_too_big_for_the_cluster_is_one_line(cluster):
    from tracekit.errors import TracekitError

    with pytest.raises(TracekitError, match=r"needs 1 GPU\(s\) and 1 CPU\(s\), but the Ray cluster has 0 GPU"):
        RayExecutor(ModelSource(SPEC), gpus_per_worker=1)


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    from tracekit.errors import TracekitError
    from tracekit.studies import ray_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    with pytest.raises(TracekitError, match=r"pip install 'tracekit\[ray\]'"):
        ray_executor.import_ray()
