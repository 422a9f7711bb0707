"""Studies: the paper's sweeps (traces, edits) over a dataset, run here or on a Ray cluster.

This floor sits above the store, tracing and editing, and imports them; none of them imports it.

    trace_study(model, records, store, kinds=("mlp",), windows=(5,))            # this process
    with RayExecutor(ModelSource("gpt2-xl"), address="auto") as pool:          # a Ray cluster
        edit_study(pool.model, records, store, methods=("rome",), layers=[...])

Ray is optional (``pip install 'tracekit[ray]'``): ``RayExecutor`` imports it when one is made.
"""

# Loaded on first use: `tracekit --help` imports the command module without torch.
_LAZY = {
    "LocalExecutor": "executors", "ModelCard": "executors", "ModelSource": "executors", "executor_for": "executors",
    "preset_layer": "executors", "RayExecutor": "ray_executor", "RemoteModel": "ray_executor",
    "edit_study": "study", "run_study": "study", "spread_layers": "study", "trace_study": "study",
    "TRACE_KINDS": "tasks", "EditTask": "tasks", "TraceTask": "tasks", "point_seed": "tasks",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"tracekit.studies.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tracekit.studies' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
