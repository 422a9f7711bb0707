"""Claims: how processes sharing one store (``--shard shared``) split a sweep's items as they go.

A static split (``--shard k/N``) fixes each point's process in advance, so one process can be left
with hours of work while the others idle (a hash split of 40 points gave one of two shards 25).
With claims, each process takes the next items nobody holds: before computing a batch it claims
the batch's items in one write transaction, and an item is granted when no result row holds it yet
and no live process claims it. SQLite's lock makes that check-and-claim atomic across processes.

A claim names its owner (host and process id). A claim whose process has died no longer holds, so
a rerun after a crash redoes that item; a process drops its claims when its sweep ends. Nor does a
claim made before its process started: a store copied to a fresh machine brings its old claims, and
the pids of the new machine's processes can be the same numbers. Processes
sharing a store share a host anyway (the write-ahead log needs a local disk), which is what makes
"has the owner died?" answerable; a claim from another host is taken to hold.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Sequence

from tracekit.store.db import TABLES, ResultStore, _encode
from tracekit.store.manifest import canonical_json

CLAIMS_SCHEMA = ("CREATE TABLE IF NOT EXISTS claims (result_table TEXT NOT NULL, item TEXT NOT NULL, "
                 "owner TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (result_table, item))")


def owner_id(pid: int | None = None) -> str:
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def owner_alive(owner: str, claimed_at: float | None = None) -> bool:
    """Whether the process that made a claim (at ``claimed_at``, epoch seconds) still runs."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # cannot be checked from here
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True  # someone else's process, or not a pid we wrote: leave it held
    started = process_start(int(pid))
    # the start time is known to about a second (btime is whole seconds): 2 s of slack
    return claimed_at is None or started is None or claimed_at >= started - 2.0


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), where /proc says (Linux); else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, clock ticks after boot
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def claim(store: ResultStore, table: str, keys: Sequence[dict]) -> list[bool]:
    """Claim the items with these keys for this process; for each, whether it was granted (not yet
    stored, and not held by another live process)."""
    spec, me, conn = TABLES[table], owner_id(), store.conn
    conn.execute(CLAIMS_SCHEMA)
    is_stored = f"SELECT 1 FROM {table} WHERE " + " AND ".join(f"{c} = ?" for c in spec.key)
    granted = []
    conn.execute("BEGIN IMMEDIATE")  # the write lock first: no other process checks in between
    try:
        for key in keys:
            values = [_encode(key[c]) for c in spec.key]
            item = canonical_json(values)
            holder = conn.execute("SELECT owner, created FROM claims WHERE result_table = ? AND item = ?",
                                  (table, item)).fetchone()
            free = (conn.execute(is_stored, values).fetchone() is None
                    and (holder is None or holder[0] == me or not owner_alive(*holder)))
            if free:
                conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)", (table, item, me, time.time()))
            granted.append(free)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return granted


def release_claims(store: ResultStore) -> None:
    """Drop this process's claims (its sweep has ended; finished items are in the store)."""
    store.conn.execute(CLAIMS_SCHEMA)
    store.conn.execute("DELETE FROM claims WHERE owner = ?", (owner_id(),))
