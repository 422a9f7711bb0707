"""Studies: the paper's sweeps (traces, edits) over a dataset, run here or on a Ray cluster.

This floor sits above the store, tracing and editing, and imports them; none of them imports it.

    trace_study(model, records, store, kinds=("mlp",), windows=(5,))            # this process
    with RayExecutor(ModelSource("gpt2-xl"), address="auto") as pool:          # a Ray cluster
        edit_study(pool.model, records, store, methods=("rome",), layers=[...])

Ray is optional (``pip install 'tracekit[ray]'``): ``RayExecutor`` imports it when one is made.
"""

from tracekit.studies.executors import LocalExecutor, ModelCard, ModelSource, executor_for, preset_layer
from tracekit.studies.ray_executor import RayExecutor, RemoteModel
from tracekit.studies.study import edit_study, run_study, spread_layers, trace_study
from tracekit.studies.tasks import TRACE_KINDS, EditTask, TraceTask, point_seed


__all__ = ["EditTask", "LocalExecutor", "ModelCard", "ModelSource", "RayExecutor", "RemoteModel", "TRACE_KINDS",
           "TraceTask", "edit_study", "executor_for", "point_seed", "preset_layer", "run_study", "spread_layers",
           "trace_study"]
