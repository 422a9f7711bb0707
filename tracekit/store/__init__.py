"""The crash-safe result store (SQLite), resumable sharded sweeps, and shard merging.

    store = ResultStore("runs/smollm.sqlite")
    store.begin("trace", config={...}, seed=0)        # manifest: config hash, seed, versions
    run_sweep(store, "traces", items, work=..., shard=Shard.parse("0/4"))
    df = store.edits_frame()                          # pandas, one column per score
"""

# Loaded on first use, so the recipes' argument helpers (tracekit.store.cli) import without pandas.
_LAZY = {
    "TABLES": "db", "ResultStore": "db", "config_hash": "manifest", "model_identity": "manifest", "versions": "manifest",
    "MergeReport": "merge", "merge_stores": "merge", "Shard": "sweep", "SharedShard": "sweep", "SweepItem": "sweep",
    "SweepReport": "sweep", "print_report": "sweep", "run_sweep": "sweep", "shard_from_env": "sweep",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"tracekit.store.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tracekit.store' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
