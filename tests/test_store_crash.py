"""kill -9 in the middle of a sweep, then resume: every item is stored exactly once."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

from tracekit.store import ResultStore

N_POINTS, LAYERS = 12, (0, 1, 2, 3)

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/tracekit"

# The store needs neither torch nor transformers: skip tracekit/__init__ (which loads the model
# code, ~10 s here) so that the two sweep processes start in about a second.
SWEEP = f"""
import sys, time, types
package = types.ModuleType("tracekit")
package.__path__ = [{PACKAGE!r}]
sys.modules["tracekit"] = package
from tracekit.store import ResultStore, SweepItem, run_sweep

store, log = ResultStore(sys.argv[1]), open(sys.argv[2], "a")
items = [SweepItem(dict(model="m", dataset="cf", case_id=c, method="ft-1", problem="fact-forcing", layer=layer))
         for c in range({N_POINTS}) for layer in {LAYERS}]

def work(item):
    log.write(f"{{item.key['case_id']}},{{item.key['layer']}}\\n")
    log.flush()
    time.sleep(0.03)  # the 'edit'
    return {{"status": "ok", "scores": {{"rewrite": item.key["case_id"] + item.key["layer"] / 10}}}}

run_sweep(store, "edits", items, work=work, progress=False)
"""


def stored(path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT COUNT(*) FROM edits").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_kill_9_then_resume_gives_every_item_once(tmp_path):
    script, store, log = tmp_path / "sweep.py", tmp_path / "s.sqlite", tmp_path / "calls.log"
    script.write_text(SWEEP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(script), str(store), str(log)], env=env)
    deadline = time.time() + 120
    while stored(store) < 10 and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    total = N_POINTS * len(LAYERS)
    at_kill = stored(store)
    assert 10 <= at_kill < total  # killed mid-run

    subprocess.run([sys.executable, str(script), str(store), str(log)], env=env, check=True)
    with ResultStore(store, readonly=True) as result:
        df = result.edits_frame()
    assert len(df) == total
    keys = list(zip(df["case_id"], df["layer"]))
    assert sorted(keys) == sorted((c, layer) for c in range(N_POINTS) for layer in LAYERS)  # each exactly once
    assert (df["rewrite"] == df["case_id"] + df["layer"] / 10).all()
    calls = Counter(log.read_text().split())
    assert set(calls.values()) <= {1, 2} and sum(n == 2 for n in calls.values()) <= 1  # only the item in flight redone
    assert sum(calls.values()) <= total + 1
