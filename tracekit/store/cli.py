"""Argument helpers the recipes share: --store / --shard / --retry-failed, and one-line errors.
(The ``tracekit store`` command itself lives in ``tracekit.cli.store``.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parsers are built without pandas (`tracekit --help`); the store loads when a recipe runs
    from tracekit.store.db import ResultStore
    from tracekit.store.sweep import Shard


def run_recipe(fn) -> int:
    """Run a recipe body; bad input prints one line (no traceback) and exits with 2."""
    from tracekit.cli.common import run_reporting_errors

    return run_reporting_errors(fn, ": finished items are in the store; rerun to resume")


def add_store_args(parser, default_store: str = "runs/study.sqlite") -> None:
    """--store / --shard / --retry-failed, shared by the recipes."""
    group = parser.add_argument_group("results")
    group.add_argument("--store", default=default_store,
                       help="SQLite result store, created if missing; '{shard}' in the name becomes the shard "
                            "index (one file per shard, joined later by `tracekit store merge`); default: %(default)s")
    group.add_argument("--shard", default=None, metavar="K/N",
                       help="run only shard K of N (K = 0..N-1; points split by a stable hash of their case id), or "
                            "'shared': processes on one machine given the same --store split the items as they go "
                            "(each claims what it computes next); default: $TRACEKIT_SHARD, else everything")
    group.add_argument("--retry-failed", action="store_true", help="recompute items stored as failed")


def open_store_from_args(args) -> tuple[ResultStore, Shard | None]:
    from tracekit.errors import TracekitError
    from tracekit.store.db import ResultStore
    from tracekit.store.sweep import SharedShard, shard_from_env

    shard = shard_from_env(args.shard)
    path = args.store
    if "{shard}" in path:
        if isinstance(shard, SharedShard):
            raise TracekitError("--shard shared splits the work through one store: give --store without '{shard}'")
        path = path.replace("{shard}", str(shard.index) if shard is not None else "all")
    store = ResultStore(path)
    if args.retry_failed:
        for table in ("traces", "edits"):
            store.delete_failed(table)
    return store, shard
