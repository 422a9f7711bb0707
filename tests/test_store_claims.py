"""--shard shared: processes on one store split a sweep through claims, each item computed once."""

import argparse
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from tracekit import TracekitError
from tracekit.store import ResultStore, Shard, SharedShard, SweepItem, run_sweep
from tracekit.store.claims import claim, owner_id, process_start, release_claims
from tracekit.store.cli import open_store_from_args


def items(n_points=12, layers=(0, 3)):
    return [SweepItem(dict(model="m", dataset="cf", case_id=c, method="rome", problem="error-injection", layer=layer))
            for c in range(n_points) for layer in layers]


def slow_score(item):
    time.sleep(0.05)
    return {"status": "ok", "scores": {"rewrite": item.key["case_id"] / 100}}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def hold(store, case_id, pid, created=None):
    """A claim on edit (case_id, layer 0) by process ``pid``, as that process would have written it
    (now, unless ``created`` says when)."""
    claim(store, "edits", [])  # creates the claims table
    store.conn.execute("INSERT INTO claims VALUES ('edits', ?, ?, ?)",
                       (f'["m","cf",{case_id},"rome","error-injection",0]', owner_id(pid),
                        time.time() if created is None else created))


def test_a_claim_holds_while_its_process_lives(tmp_path):
    keys = [item.key for item in items(3, layers=(0,))]
    with ResultStore(tmp_path / "s.sqlite") as store:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            hold(store, 0, sleeper.pid)
            hold(store, 1, dead_pid())
            store.add_edit(**keys[2], scores={"rewrite": 1.0})
            # held by a live process; left by a dead one (taken); already stored
            assert claim(store, "edits", keys) == [False, True, False]
            assert claim(store, "edits", keys[1:2]) == [True]  # a process may claim again what it holds
        finally:
            sleeper.kill()
            sleeper.wait()
        assert claim(store, "edits", keys[:1]) == [True]  # its owner has died since
        release_claims(store)
        assert store.conn.execute("SELECT count(*) FROM claims").fetchone()[0] == 0


@pytest.mark.skipif(process_start(os.getpid()) is None, reason="no /proc to tell when a process started")
def test_a_claim_older_than_its_live_process_is_stale(tmp_path):
    """A store copied to a fresh machine: its claims name pids that a new process may have again."""
    keys = [item.key for item in items(2, layers=(0,))]
    with ResultStore(tmp_path / "s.sqlite") as store:
        before = time.time()
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert before - 2 <= process_start(sleeper.pid) <= time.time() + 2
            hold(store, 0, sleeper.pid, created=time.time() - 3600)  # the same pid, an hour before it started
            hold(store, 1, sleeper.pid)
            assert claim(store, "edits", keys) == [True, False]
        finally:
            sleeper.kill()
            sleeper.wait()


def test_a_shared_sweep_skips_what_another_process_holds(tmp_path):
    todo = items(4, layers=(0,))
    with ResultStore(tmp_path / "s.sqlite") as store:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            hold(store, 2, sleeper.pid)
            report = run_sweep(store, "edits", todo, work=slow_score, shard=SharedShard(), batch_size=2,
                               progress=False)
        finally:
            sleeper.kill()
            sleeper.wait()
        assert (report.computed, report.elsewhere) == (3, 1)
        assert "1 taken by another process" in report.summary()
        assert sorted(store.edits_frame()["case_id"]) == [0, 1, 3]
        assert store.conn.execute("SELECT count(*) FROM claims WHERE owner = ?", (owner_id(),)).fetchone()[0] == 0


def _worker(path, queue):
    with ResultStore(path) as store:
        report = run_sweep(store, "edits", items(), work=slow_score, shard=SharedShard(), batch_size=3,
                           progress=False)
    queue.put((report.computed, report.elsewhere + report.already_done))


def test_processes_sharing_a_store_compute_every_item_once(tmp_path):
    path = tmp_path / "s.sqlite"
    ResultStore(path).close()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_worker, args=(path, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    reports = [queue.get(timeout=120) for _ in workers]  # (computed, by the other)
    for worker in workers:
        worker.join()
    assert sum(computed for computed, _ in reports) == len(items())  # none twice, none left out
    assert all(computed > 0 for computed, _ in reports)  # neither idled while the other worked
    assert all(computed + by_other == len(items()) for computed, by_other in reports)
    with ResultStore(path, readonly=True) as store:
        assert store.count("edits", "ok") == len(items())


def test_shared_is_parsed_and_needs_one_store(tmp_path):
    assert Shard.parse("shared") == SharedShard() and str(SharedShard()) == "shared"
    assert SharedShard().owns(12345)
    args = argparse.Namespace(store=str(tmp_path / "shard-{shard}.sqlite"), shard="shared", retry_failed=False)
    with pytest.raises(TracekitError, match="without '{shard}'"):
        open_store_from_args(args)
    args.store = str(tmp_path / "one.sqlite")
    store, shard = open_store_from_args(args)
    store.close()
    assert shard == SharedShard() and (tmp_path / "one.sqlite").is_file()
