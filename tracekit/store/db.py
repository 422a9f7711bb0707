"""The result store: one SQLite file holding every trace, edit result and known-fact verdict.

Why SQLite (through the standard library's ``sqlite3``):
- each result is one INSERT, which SQLite commits atomically; with the write-ahead log
  (WAL) a process killed at any instant (kill -9 included) leaves every committed row
  intact and none half-written, so a crash loses at most the item being computed;
- a UNIQUE key per table (trace: model, dataset, case, kind, window; edit: model, dataset,
  case, method, problem, layer) makes a duplicate impossible, even when two processes race
  on the same item: the second insert is ignored;
- "what is done" is one indexed query, so a rerun skips finished items instantly;
- nothing to install or run, one portable file per run or shard, readable by pandas and
  any SQLite tool. DuckDB would add a dependency for no gain at this size (~10^5 rows);
  Parquet parts would need our own compaction and duplicate handling.
WAL needs a local disk (not NFS); on a cluster, give each shard its own store file on
local or scratch disk and ``tracekit store merge`` them (``journal="delete"`` also works).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from tracekit.errors import TracekitError
from tracekit.store.manifest import canonical_json, code_version, command_line, config_hash, versions


@dataclass(frozen=True)
class TableSpec:
    key: tuple[str, ...]
    values: tuple[str, ...]
    types: dict


TABLES = {
    "traces": TableSpec(("model", "dataset", "case_id", "kind", "window"),
                        ("status", "p_clean", "p_noise", "effect_max", "effect_last", "result"),
                        {"case_id": "INTEGER", "window": "INTEGER", "p_clean": "REAL", "p_noise": "REAL"}),
    "edits": TableSpec(("model", "dataset", "case_id", "method", "problem", "layer"),
                       ("status", "scores", "result"),
                       {"case_id": "INTEGER", "layer": "INTEGER"}),
    "known_facts": TableSpec(("model", "dataset", "case_id", "new_tokens"),
                             ("prompt", "known", "continuation"),
                             {"case_id": "INTEGER", "new_tokens": "INTEGER", "known": "INTEGER"}),
}


def _schema(name: str, spec: TableSpec) -> str:
    columns = [f"{c} {spec.types.get(c, 'TEXT')} NOT NULL" for c in spec.key]
    columns += [f"{c} {spec.types.get(c, 'TEXT')}" for c in spec.values] + ["created REAL NOT NULL"]
    return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(columns)}, UNIQUE ({', '.join(spec.key)}))"


MANIFEST_SCHEMA = ("CREATE TABLE IF NOT EXISTS manifest (sweep TEXT PRIMARY KEY, config_hash TEXT NOT NULL, "
                   "config TEXT NOT NULL, seed INTEGER, versions TEXT NOT NULL, command TEXT, created REAL NOT NULL)")

# Every begin() of a sweep, resumes included: the manifest keeps the first run's command and
# versions; this log says which commands and which code made the rest.
RUNS_SCHEMA = ("CREATE TABLE IF NOT EXISTS runs (sweep TEXT NOT NULL, config_hash TEXT NOT NULL, command TEXT, "
               "code TEXT, versions TEXT NOT NULL, started REAL NOT NULL, UNIQUE (sweep, started, command))")


def _encode(value):
    if isinstance(value, (dict, list, tuple)):
        return canonical_json(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


JOURNAL_MODES = ("wal", "delete", "truncate", "persist")  # SQLite's journal modes that survive a crash


def _check_table(table: str) -> str:
    if table not in TABLES:
        raise TracekitError(f"unknown result table {table!r}; choose one of {', '.join(TABLES)}")
    return table


class ResultStore:
    """``ResultStore(path)``: open or create a store; ``readonly=True`` for analysis.

    ``journal``: SQLite's journal mode, "wal" (default) or "delete" where WAL cannot work (NFS);
    a store whose file system refuses the mode asked is an error, not a silent downgrade.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, journal: str = "wal"):
        self.path = Path(path)
        journal = str(journal).lower()
        if journal not in JOURNAL_MODES:
            raise TracekitError(f"unknown journal mode {journal!r}; choose one of {', '.join(JOURNAL_MODES)}")
        if self.path.is_dir():
            raise TracekitError(f"{self.path} is a folder; give the path of a .sqlite result store file")
        if readonly and not self.path.is_file():
            raise TracekitError(f"no result store at {self.path}; run a recipe with --store {self.path} first")
        try:
            if readonly:
                self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
                self._check_is_store()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)  # autocommit
                self._check_is_store(allow_empty=True)
                mode = self.conn.execute(f"PRAGMA journal_mode={journal}").fetchone()[0]
                if mode.lower() != journal:
                    self.conn.close()
                    raise TracekitError(f"{self.path}: SQLite could not use journal mode {journal!r} here (got "
                                        f"{mode!r}); put the store on a local disk or pass journal='delete'")
                self.conn.execute("PRAGMA synchronous=FULL")
                for name, spec in TABLES.items():
                    self.conn.execute(_schema(name, spec))
                self.conn.execute(MANIFEST_SCHEMA)
                self.conn.execute(RUNS_SCHEMA)
        except sqlite3.DatabaseError as err:  # not SQLite at all, or unreadable
            raise TracekitError(f"{self.path} is not a tracekit result store (SQLite says: {err})") from None

    def _check_is_store(self, allow_empty: bool = False) -> None:
        """The file is SQLite and holds tracekit's tables (or nothing yet, when creating)."""
        tables = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables & {*TABLES, "manifest"} or (allow_empty and not tables):
            return
        self.conn.close()
        found = ", ".join(sorted(tables)[:5]) or "no tables"
        raise TracekitError(f"{self.path} is an SQLite file but not a tracekit result store ({found})")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    # ---- manifest -------------------------------------------------------------------------
    def begin(self, sweep: str, config: dict, seed: int | None = None) -> str:
        """Record (or check) the settings of sweep ``sweep``; returns the config hash.

        ``config`` holds what changes a result's values but is not in its key (model identity,
        samples, noise, hyperparameters): resuming with other settings would mix incomparable rows.
        """
        digest = config_hash(config)
        row = self.conn.execute("SELECT config_hash, config FROM manifest WHERE sweep = ?", (sweep,)).fetchone()
        if row is None:
            self.conn.execute("INSERT OR IGNORE INTO manifest VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (sweep, digest, canonical_json(config), seed, canonical_json(versions()),
                               command_line(), time.time()))
        elif row[0] != digest:
            old = json.loads(row[1])
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise TracekitError(f"store {self.path} holds sweep '{sweep}' made with other settings "
                                f"({', '.join(changed)} differ); use the same settings or another --store")
        self.conn.execute("INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                          (sweep, digest, command_line(), code_version(), canonical_json(versions()), time.time()))
        return digest

    def manifests(self) -> dict[str, dict]:
        rows = self.conn.execute("SELECT sweep, config_hash, config, seed, versions, command, created FROM manifest")
        return {r[0]: {"config_hash": r[1], "config": json.loads(r[2]), "seed": r[3],
                       "versions": json.loads(r[4]), "command": r[5], "created": r[6]} for r in rows}

    def runs(self) -> list[dict]:
        """Every run of every sweep on this store, oldest first (none for a store made before the log)."""
        if not self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone():
            return []
        rows = self.conn.execute("SELECT sweep, config_hash, command, code, versions, started FROM runs ORDER BY started")
        return [{"sweep": r[0], "config_hash": r[1], "command": r[2], "code": r[3], "versions": json.loads(r[4]),
                 "started": r[5]} for r in rows]

    # ---- writing ----------------------------------------------------------------------------
    def put(self, table: str, key: dict, values: dict) -> bool:
        """Write one result in its own transaction; False if its key was already there."""
        spec = TABLES[_check_table(table)]
        if set(key) != set(spec.key):
            raise TracekitError(f"{table} key needs exactly {', '.join(spec.key)}")
        unknown = set(values) - set(spec.values)
        if unknown:
            raise TracekitError(f"{table} has no column {', '.join(sorted(unknown))}")
        columns = list(spec.key) + list(values) + ["created"]
        params = [_encode(key[c]) for c in spec.key] + [_encode(v) for v in values.values()] + [time.time()]
        cursor = self.conn.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT DO NOTHING", params)
        return cursor.rowcount == 1

    def add_trace(self, *, model: str, dataset: str, case_id: int, kind: str, window: int,
                  p_clean: float | None, p_noise: float | None, effect_max: Sequence[float],
                  effect_last: Sequence[float] | None = None, result=None, status: str = "ok") -> bool:
        """One point's trace: per-layer effects (max over tokens, and at the last subject token)."""
        key = dict(model=model, dataset=dataset, case_id=int(case_id), kind=kind, window=int(window))
        return self.put("traces", key, dict(status=status, p_clean=p_clean, p_noise=p_noise,
                                            effect_max=[float(x) for x in effect_max],
                                            effect_last=None if effect_last is None else [float(x) for x in effect_last],
                                            result=result))

    def add_edit(self, *, model: str, dataset: str, case_id: int, method: str, problem: str, layer: int,
                 scores: dict, result=None, status: str = "ok") -> bool:
        key = dict(model=model, dataset=dataset, case_id=int(case_id), method=method, problem=problem, layer=int(layer))
        return self.put("edits", key, dict(status=status, scores={k: _encode(v) for k, v in scores.items()},
                                           result=result))

    def delete_failed(self, table: str) -> int:
        """Forget rows that failed (not those skipped by design) so that a rerun retries them."""
        if _check_table(table) == "known_facts":
            return 0  # verdicts have no status
        return self.conn.execute(f"DELETE FROM {table} WHERE status LIKE 'failed%'").rowcount

    # ---- reading ----------------------------------------------------------------------------
    def done_keys(self, table: str) -> set[tuple]:
        spec = TABLES[_check_table(table)]
        return set(self.conn.execute(f"SELECT {', '.join(spec.key)} FROM {table}"))

    def count(self, table: str, status: str | None = None) -> int:
        _check_table(table)
        if status is None:
            return self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        return self.conn.execute(f"SELECT COUNT(*) FROM {table} WHERE status = ?", (status,)).fetchone()[0]

    def frame(self, table: str) -> pd.DataFrame:
        """The raw table, one row per stored result."""
        _check_table(table)
        return pd.read_sql_query(f"SELECT * FROM {table}", self.conn)

    def traces_frame(self, *, long: bool = True, only_ok: bool = True) -> pd.DataFrame:
        """Traces; ``long``: one row per (trace, layer) with columns effect (max over tokens) and
        effect_last (last subject token), else one row per trace with per-layer lists."""
        df = self.frame("traces")
        if only_ok:
            df = df[df["status"] == "ok"]
        df = df.drop(columns=["result", "created"])
        df["effect_max"] = df["effect_max"].map(json.loads)
        df["effect_last"] = df["effect_last"].map(lambda s: json.loads(s) if isinstance(s, str) else None)
        if not long:
            return df.reset_index(drop=True)
        rows = []
        for rec in df.itertuples(index=False):
            last = rec.effect_last or [float("nan")] * len(rec.effect_max)
            for layer, (effect, effect_last) in enumerate(zip(rec.effect_max, last)):
                rows.append((rec.model, rec.dataset, rec.case_id, rec.kind, rec.window, layer, effect, effect_last,
                             rec.p_clean, rec.p_noise))
        columns = ["model", "dataset", "case_id", "kind", "window", "layer", "effect", "effect_last", "p_clean", "p_noise"]
        return pd.DataFrame(rows, columns=columns)

    def edits_frame(self, *, only_ok: bool = True) -> pd.DataFrame:
        """One row per edit, every score as its own column."""
        df = self.frame("edits")
        if only_ok:
            df = df[df["status"] == "ok"]
        scores = pd.DataFrame([json.loads(s) if s else {} for s in df["scores"]], index=df.index)
        return pd.concat([df.drop(columns=["scores", "result", "created"]), scores], axis=1).reset_index(drop=True)

    def result(self, table: str, key: dict):
        """The full result JSON of one stored item (None if absent)."""
        spec = TABLES[_check_table(table)]
        row = self.conn.execute(f"SELECT result FROM {table} WHERE " + " AND ".join(f"{c} = ?" for c in spec.key),
                                [_encode(key[c]) for c in spec.key]).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

    # ---- known-fact cache (see tracekit.data.known) -------------------------------------------
    def get_known(self, model_id: str, records, new_tokens: int) -> dict[int, bool]:
        found: dict[int, bool] = {}
        for record in records:
            row = self.conn.execute("SELECT known, prompt FROM known_facts WHERE model = ? AND dataset = ? "
                                    "AND case_id = ? AND new_tokens = ?",
                                    (model_id, record.source, record.case_id, new_tokens)).fetchone()
            if row is not None and row[1] == record.text:  # a changed prompt is a different point
                found[record.case_id] = bool(row[0])
        return found

    def put_known(self, model_id: str, rows: Iterable, new_tokens: int) -> None:
        with self.conn:  # one transaction per batch of verdicts
            self.conn.execute("BEGIN")
            for record, known, continuation in rows:
                self.conn.execute("INSERT OR REPLACE INTO known_facts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                  (model_id, record.source, record.case_id, new_tokens, record.text, int(known),
                                   continuation, time.time()))
