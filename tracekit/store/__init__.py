"""The crash-safe result store (SQLite), resumable sharded sweeps, and shard merging.

    store = ResultStore("runs/smollm.sqlite")
    store.begin("trace", config={...}, seed=0)        # manifest: config hash, seed, versions
    run_sweep(store, "traces", items, work=..., shard=Shard.parse("0/4"))
    df = store.edits_frame()                          # pandas, one column per score
"""

from tracekit.store.db import TABLES, ResultStore
from tracekit.store.manifest import config_hash, model_identity, versions
from tracekit.store.merge import MergeReport, merge_stores
from tracekit.store.sweep import Shard, SweepItem, SweepReport, print_report, run_sweep, shard_from_env

__all__ = ["MergeReport", "ResultStore", "Shard", "SweepItem", "SweepReport", "TABLES", "config_hash",
           "merge_stores", "model_identity", "print_report", "run_sweep", "shard_from_env", "versions"]
