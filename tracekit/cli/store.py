"""``tracekit store show | merge | export``: look inside result stores and join shards."""

from __future__ import annotations

import datetime
from pathlib import Path

from tracekit.cli.common import console


def _show(args) -> None:
    from rich.table import Table

    from tracekit.store.db import ResultStore

    with ResultStore(args.store, readonly=True) as store:
        manifest = Table(title=f"{args.store}: sweeps")
        for column in ("sweep", "config hash", "seed", "started", "command"):
            manifest.add_column(column)
        for sweep, m in store.manifests().items():
            started = datetime.datetime.fromtimestamp(m["created"]).isoformat(timespec="seconds")
            manifest.add_row(sweep, m["config_hash"], str(m["seed"]), started, m["command"] or "")
        console.print(manifest)
        runs = store.runs()
        if runs:
            log = Table(title="runs (every start or resume)")
            for column in ("started", "sweep", "code", "command"):
                log.add_column(column)
            for run in runs:
                started = datetime.datetime.fromtimestamp(run["started"]).isoformat(timespec="seconds")
                log.add_row(started, run["sweep"], run["code"] or run["versions"].get("tracekit", ""), run["command"] or "")
            console.print(log)
        _group_table("traces", store, ["model", "kind", "window"])
        _group_table("edits", store, ["model", "method", "problem"])
        console.print(f"known-fact verdicts cached: {store.count('known_facts')}")


def _group_table(table: str, store, by: list[str]) -> None:
    from rich.table import Table

    df = store.frame(table)
    if df.empty:
        console.print(f"{table}: none")
        return
    df["ok"] = df["status"] == "ok"
    grouped = df.groupby(by).agg(points=("case_id", "nunique"), rows=("case_id", "size"), ok=("ok", "sum"))
    if table == "edits":
        grouped["layers"] = df.groupby(by)["layer"].apply(lambda s: ",".join(map(str, sorted(set(s)))))
    out = Table(title=table)
    for column in [*by, *grouped.columns]:
        out.add_column(column)
    for index, row in grouped.iterrows():
        out.add_row(*map(str, index if isinstance(index, tuple) else (index,)), *map(str, row.tolist()))
    console.print(out)


def _merge(args) -> None:
    from tracekit.store.merge import merge_stores

    report = merge_stores(args.output, args.inputs)
    console.print(f"merged {len(args.inputs)} store(s) into {args.output}: {report.summary()}", highlight=False)


def _export(args) -> None:
    from tracekit.store.db import ResultStore

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ResultStore(args.store, readonly=True) as store:
        store.traces_frame(long=True, only_ok=False).to_csv(out / "traces.csv", index=False)
        store.edits_frame(only_ok=False).to_csv(out / "edits.csv", index=False)
    console.print(f"wrote {out / 'traces.csv'} and {out / 'edits.csv'}")


def register(sub) -> None:
    parser = sub.add_parser("store", help="inspect, merge and export result stores",
                            description="Result stores are SQLite files written by the recipes.")
    commands = parser.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    p = commands.add_parser("show", help="what a store holds: sweeps, runs, traces, edits")
    p.add_argument("store", help="path of a .sqlite result store")
    p.set_defaults(func=_show)
    p = commands.add_parser("merge", help="join shard stores into one",
                            description="Copy every row of INPUTS into OUTPUT (created if missing). Identical "
                                        "duplicates are kept once; differing rows or settings stop the merge.")
    p.add_argument("output", help="the merged store")
    p.add_argument("inputs", nargs="+", help="shard stores")
    p.set_defaults(func=_merge)
    p = commands.add_parser("export", help="write traces.csv and edits.csv")
    p.add_argument("store", help="path of a .sqlite result store")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_export)
