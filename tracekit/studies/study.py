"""The paper's two sweeps over a dataset, written into a result store item by item.

    trace_study(model, records, store, kinds=("mlp",), windows=(5,))
    edit_study(model, records, store, methods=("rome", "ft-1"), problems=("error-injection",), layers=[...])

Both resume (finished items are skipped), shard (``shard=Shard(k, N)``) and record their
settings in the store's manifest. ``model`` is a loaded model (the items run here) or a
Ray pool's ``RemoteModel`` (the items run on the cluster's workers; see ``RayExecutor``).
The tracer and the editor are arguments (defaults: ``tracekit.tracing.trace`` /
``zero_trace`` and ``tracekit.editing.api.edit``), so tests and other tools can drive the
same sweep with their own functions.
"""

from __future__ import annotations

from typing import Callable, Sequence

from tracekit.data.records import FactRecord
from tracekit.errors import TracekitError, check
from tracekit.store.db import ResultStore
from tracekit.store.manifest import model_identity
from tracekit.store.sweep import Shard, SweepReport
from tracekit.studies.executors import executor_for
from tracekit.studies.tasks import EditTask, TraceTask


def spread_layers(n_layers: int, count: int = 8, default_layer: int | None = None) -> list[int]:
    """About ``count`` layers spread evenly from the first to the last, plus the default layer
    (the paper's GPT-J set {1, 5, ..., 25, 28} + 6, 1-based; here 0-based)."""
    if n_layers < 1 or count < 1:
        raise TracekitError("need at least one layer")
    count = min(count, n_layers)
    layers = {round(i * (n_layers - 1) / max(count - 1, 1)) for i in range(count)}
    if default_layer is not None:
        if not 0 <= default_layer < n_layers:
            raise TracekitError(f"default layer {default_layer} is outside 0..{n_layers - 1}")
        layers.add(default_layer)
    return sorted(layers)


def run_study(model, task, records: Sequence[FactRecord], store: ResultStore, *, shard: Shard | None = None,
              progress: bool = True) -> SweepReport:
    """Check ``task`` against the model, record its settings, and compute what the store lacks."""
    task.check(model.n_layers, str(model.spec))
    model_id = model_identity(model)
    store.begin(task.sweep, task.config(model_id), task.seed)
    return executor_for(model).run(task, store, task.items(model_id, records), shard=shard, progress=progress)


def trace_study(model, records: Sequence[FactRecord], store: ResultStore, *, kinds=("mlp",), windows=(5,),
                samples: int = 10, noise="s3", seed: int = 0, shard: Shard | None = None,
                trace_fn: Callable | None = None, zero_fn: Callable | None = None,
                progress: bool = True, batch: int = 1) -> SweepReport:
    """Trace every (point, kind, window) not yet in the store; o_true is the traced target.
    Point i's noise seed is ``seed + case_id``. ``batch``: points traced together (``trace_many``:
    their rows packed into shared passes; the same results)."""
    check(isinstance(batch, int) and batch >= 1, f"batch must be a positive integer, got {batch!r}")
    task = TraceTask(tuple(kinds), tuple(int(w) for w in windows), samples, noise, seed, trace_fn, zero_fn, batch)
    return run_study(model, task, records, store, shard=shard, progress=progress)


def edit_study(model, records: Sequence[FactRecord], store: ResultStore, *, methods=("rome",),
               problems=("error-injection",), layers: Sequence[int], default_layer: int | None = None,
               hparams=None, seed: int = 0, shard: Shard | None = None, metrics=None,
               edit_fn: Callable | None = None, progress: bool = True, batch: int = 1,
               score_batch: int | None = None, convention: str = "paper-code") -> SweepReport:
    """Edit every (point, method, problem, layer) not yet in the store and keep all its scores.

    ``hparams``: None uses the editing presets for the model, method and problem; one object
    applies to every method; a dict maps method -> hyperparameters. The noise seed of a point
    (Fact Forcing, Tracing Reversal) is ``seed + case_id``, as in ``trace_study``. Items run
    point by point so per-point preparation is shared. A point that does not qualify for a
    problem (Fact Erasure with p(o_true) < 0.02, ...) is stored as "skipped: <reason>".
    ``metrics``: a ``MetricsConfig`` for the scoring (None: the default). Key statistics are
    computed once per layer before any edit (with Ray: by one worker). ``batch``: points edited
    together at each (method, problem, layer) (batched v* and scoring; the same results);
    ``score_batch``: of those, points scored in one pass (default: all of them). ``convention``:
    how Fact Forcing and Tracing Reversal noise the subject (``tracekit.editing.subject_noise``:
    "paper-code", the default, or "tracekit"); recorded in the store's settings when not the default.
    """
    task = EditTask(tuple(methods), tuple(problems), tuple(int(x) for x in layers), hparams, seed, default_layer,
                    edit_fn, metrics, batch=int(batch), score_batch=score_batch, convention=convention)
    return run_study(model, task, records, store, shard=shard, progress=progress)
