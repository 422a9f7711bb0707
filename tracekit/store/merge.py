"""Join shard stores into one: union of rows, with every conflict caught before writing.

Rows with the same key and the same values (a shard rerun, an overlap) are kept once; the
same key with different values means the stores came from different runs, and the merge
stops without writing anything. Manifests must agree sweep by sweep (same config hash); the
run logs are joined.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from tracekit.errors import TracekitError
from tracekit.store.db import TABLES, ResultStore


@dataclass
class MergeReport:
    added: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{table}: +{n}" + (f" ({self.duplicates[table]} identical duplicates)" if self.duplicates.get(table) else "")
                 for table, n in self.added.items()]
        return ", ".join(parts)


def merge_stores(output: str | os.PathLike, inputs: list[str | os.PathLike]) -> MergeReport:
    """Merge ``inputs`` into ``output`` (created if missing; its own rows are kept). A merge that
    fails leaves no trace: an output it created is removed, an existing one keeps its rows."""
    if not inputs:
        raise TracekitError("give at least one store to merge")
    output = Path(output)
    for path in inputs:
        if Path(path).resolve() == output.resolve():
            raise TracekitError(f"{path} is the output store; merge other stores into it")
        ResultStore(path, readonly=True).close()  # a one-line error for a missing or foreign file
    created = not output.exists()
    try:
        return _merge_into(output, inputs)
    except BaseException as err:
        if created:
            for leftover in (output, output.with_name(output.name + "-wal"), output.with_name(output.name + "-shm")):
                leftover.unlink(missing_ok=True)
        if isinstance(err, sqlite3.Error):  # e.g. a store from an older tracekit without some table
            raise TracekitError(f"cannot merge into {output}: SQLite says {err}") from None
        raise


def _merge_into(output: Path, inputs) -> MergeReport:
    report = MergeReport()
    with ResultStore(output) as out:
        conn = out.conn
        for i, path in enumerate(inputs):
            conn.execute(f"ATTACH DATABASE ? AS src{i}", (str(path),))
        try:
            _check_manifests(conn, inputs)
            _check_conflicts(conn, inputs)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for i in range(len(inputs)):
                    conn.execute(f"INSERT OR IGNORE INTO main.manifest SELECT * FROM src{i}.manifest")
                    if conn.execute(f"SELECT 1 FROM src{i}.sqlite_master WHERE name = 'runs'").fetchone():
                        conn.execute(f"INSERT OR IGNORE INTO main.runs SELECT * FROM src{i}.runs")
                for table, spec in TABLES.items():
                    before = out.count(table)
                    total = 0
                    for i in range(len(inputs)):
                        total += conn.execute(f"SELECT COUNT(*) FROM src{i}.{table}").fetchone()[0]
                        conn.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM src{i}.{table}")
                    report.added[table] = out.count(table) - before
                    report.duplicates[table] = total - report.added[table]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            for i in range(len(inputs)):
                conn.execute(f"DETACH DATABASE src{i}")
    return report


def _sources(inputs) -> list[str]:
    return ["main"] + [f"src{i}" for i in range(len(inputs))]


def _names(inputs, output_label="the output store") -> dict[str, str]:
    return {"main": output_label, **{f"src{i}": str(path) for i, path in enumerate(inputs)}}


def _check_manifests(conn: sqlite3.Connection, inputs) -> None:
    names = _names(inputs)
    seen: dict[str, tuple[str, str]] = {}
    for source in _sources(inputs):
        for sweep, digest in conn.execute(f"SELECT sweep, config_hash FROM {source}.manifest"):
            if sweep in seen and seen[sweep][0] != digest:
                raise TracekitError(f"cannot merge: sweep '{sweep}' was run with other settings in "
                                    f"{names[source]} than in {seen[sweep][1]} (config {digest} vs {seen[sweep][0]})")
            seen.setdefault(sweep, (digest, names[source]))


def _check_conflicts(conn: sqlite3.Connection, inputs) -> None:
    names = _names(inputs)
    sources = _sources(inputs)
    for table, spec in TABLES.items():
        on = " AND ".join(f"a.{c} = b.{c}" for c in spec.key)
        differ = " OR ".join(f"a.{c} IS NOT b.{c}" for c in spec.values)
        for i, first in enumerate(sources):
            for second in sources[i + 1:]:
                row = conn.execute(f"SELECT {', '.join('a.' + c for c in spec.key)} FROM {first}.{table} a "
                                   f"JOIN {second}.{table} b ON {on} WHERE {differ} LIMIT 1").fetchone()
                if row is not None:
                    key = dict(zip(spec.key, row))
                    raise TracekitError(f"cannot merge: {table} {key} differs between {names[first]} and "
                                        f"{names[second]}; these stores come from different runs")
