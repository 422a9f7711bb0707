"""docs/replication/counterfact/run_study.sh save: a running sweep's results kept where its own checkout may be lost."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tracekit.store import ResultStore

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "replication" / "counterfact" / "run_study.sh"


def store_with(path: Path, n_edits: int) -> Path:
    with ResultStore(path) as store:
        for case in range(n_edits):
            store.add_edit(model="m", dataset="counterfact", case_id=case, method="rome", problem="error-injection",
                           layer=0, scores={"rewrite": 0.5})
    return path


def edits_in(path: Path) -> int:
    return sqlite3.connect(path).execute("SELECT count(*) FROM edits WHERE status = 'ok'").fetchone()[0]


def save(tmp_path, live: Path, snap: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": sys.executable, "COMMIT": "0", "SHARED_DATA": str(tmp_path), "LIVE": str(live),
           "SNAP": str(snap), "RESUME": str(tmp_path / "checkpoint.sqlite"), "LIVE_TK": str(tmp_path / "absent.sqlite")}
    return subprocess.run(["bash", str(SCRIPT), "save"], env=env, capture_output=True, text=True, check=True)


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_save_copies_a_live_store_that_holds_more_than_the_committed_one(tmp_path):
    snap = store_with(tmp_path / "store.sqlite", 2)
    live = store_with(tmp_path / "live.sqlite", 3)
    out = save(tmp_path, live, snap)
    assert edits_in(tmp_path / "checkpoint.sqlite") == 3
    assert "checkpoint.sqlite: 0 traces, 3 edits" in out.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_save_leaves_nothing_where_the_committed_store_holds_as_much(tmp_path):
    snap = store_with(tmp_path / "store.sqlite", 3)
    live = store_with(tmp_path / "live.sqlite", 3)
    save(tmp_path, live, snap)
    assert not (tmp_path / "checkpoint.sqlite").exists()
