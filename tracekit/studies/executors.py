"""Who computes a study's items: this process (``LocalExecutor``) or a Ray cluster
(``tracekit.studies.ray_executor.RayExecutor``). Either way the driver alone writes the store.

An executor has ``model`` (what the study reads: spec, layers, identity) and
``run(task, store, items, ...)`` -> ``SweepReport``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tracekit.errors import TracekitError
from tracekit.store.db import ResultStore
from tracekit.store.manifest import model_identity
from tracekit.store.sweep import Shard, SweepItem, SweepReport, point_of, run_sweep, select_items


@dataclass(frozen=True)
class ModelSource:
    """How a worker loads the model itself: ``tracekit.load_model`` arguments (a spec or a path)."""

    spec: str
    backend: str = "hf"
    device: str | None = None  # None: cuda where the worker has a GPU, else cpu
    dtype: str = "float32"
    prepend_bos: bool | None = None
    seed: int = 0  # random:* specs

    def load(self):
        from tracekit import load_model

        return load_model(self.spec, backend=self.backend, device=self.device, dtype=self.dtype, seed=self.seed,
                          prepend_bos=self.prepend_bos)


@dataclass(frozen=True)
class ModelCard:
    """What a driver needs to know of a model that it may not hold: the store's model id
    (spec + weight fingerprint), its depth and the editing presets' default layer."""

    spec: str
    identity: str
    n_layers: int
    preset_layer: int | None
    device_type: str = "cpu"  # "cuda" where the model runs on a GPU: it sets the default batch sizes

    @classmethod
    def of(cls, model) -> "ModelCard":
        return cls(str(model.spec), model_identity(model), int(model.n_layers), preset_layer(model),
                   str(getattr(model.device, "type", model.device)))


def preset_layer(model) -> int | None:
    """The editing presets' default ROME layer for this model (None where there is no preset)."""
    card = getattr(model, "card", None)
    if isinstance(card, ModelCard):
        return card.preset_layer
    try:
        from tracekit.editing.presets import rome_preset

        return rome_preset(model).layer
    except (ImportError, TracekitError):
        return None


class LocalExecutor:
    """Computes every item here, in order, on ``model`` (``run_sweep``)."""

    def __init__(self, model):
        self.model = model

    def run(self, task, store: ResultStore, items: Sequence[SweepItem], *, shard: Shard | None = None,
            shard_by: Callable[[dict], Any] = point_of, progress: bool = True) -> SweepReport:
        _, todo = select_items(store, task.table, items, shard=shard, shard_by=shard_by)
        if any(task.needs_prepare(item) for item in todo):
            task.prepare(self.model, progress=progress)  # key statistics, all layers in one pass; cached
        batch = getattr(task, "items_per_call", 1)
        with task.session(self.model):
            if batch > 1:  # items computed together (EditTask with batch > 1)
                return run_sweep(store, task.table, items, work_many=lambda chunk: task.compute_many(self.model, chunk),
                                 batch_size=batch, shard=shard, shard_by=shard_by, progress=progress,
                                 description=task.description)
            return run_sweep(store, task.table, items, work=lambda item: task.compute(self.model, item),
                             shard=shard, shard_by=shard_by, progress=progress, description=task.description)


def executor_for(model):
    """The executor a study runs on: a ``RemoteModel``'s pool, else this process."""
    return getattr(model, "executor", None) or LocalExecutor(model)
