"""The worker side of ``RayExecutor``: one Ray actor per worker, a model loaded once, the items
it is given (``ray_executor`` has the design; the driver lives there)."""

from __future__ import annotations

import os
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tracekit.errors import TracekitError
from tracekit.store.sweep import SweepItem
from tracekit.studies.executors import ModelCard, ModelSource

INSTALL_HINT = "pip install 'tracekit[ray]'"


def import_ray():
    try:
        import ray
    except ImportError:
        raise TracekitError(f"--executor ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class Crash:
    """An item raised something other than a TracekitError (a bug, CUDA out of memory...)."""

    error: str


class StudyWorker:
    """One Ray actor: a model, loaded once, and the items it is given, one after another."""

    def __init__(self, source: ModelSource):
        self.source, self.model, self.error = source, None, None
        self.task_id, self.session = None, ExitStack()
        try:
            self.model = source.load()
            self.card = ModelCard.of(self.model)
        except Exception as err:  # noqa: BLE001 - reported to the driver by ready()
            self.error = f"{type(err).__name__}: {err}"

    def ready(self) -> dict:
        import ray

        device = None if self.model is None else str(self.model.device)
        return {"error": self.error, "card": None if self.error else self.card, "pid": os.getpid(),
                "node": ray.util.get_node_ip_address(), "device": device}

    def prepare(self, task) -> list[str]:
        """Run the task's one-off preparation (key statistics); its cache files, relative to $TRACEKIT_CACHE."""
        from tracekit.cache import cache_dir

        root = cache_dir().resolve()
        files = [Path(path).resolve() for path in task.prepare(self.model, progress=False)]
        return [str(path.relative_to(root)) for path in files if path.is_relative_to(root)]

    def missing(self, files: list[str]) -> list[str]:
        from tracekit.cache import cache_dir

        return [f for f in files if not (cache_dir() / f).is_file()]

    def read_file(self, name: str) -> bytes:
        from tracekit.cache import cache_dir

        return (cache_dir() / name).read_bytes()

    def install(self, name: str, data: bytes) -> None:
        from tracekit.cache import cache_dir, write_atomic

        write_atomic(cache_dir() / name, lambda p: p.write_bytes(data))

    def _reload(self) -> None:
        """A fresh copy of the model: the failed item may have left an edit half applied or a hook on."""
        import gc

        import torch

        self.session.close()
        self.task_id, self.model = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.model = self.source.load()

    def generate(self, prompts: list[str], kwargs: dict) -> list[str]:
        return self.model.generate(prompts, **kwargs)

    def run(self, task_id: str, task, batch: list[tuple[int, SweepItem]]):
        """Yield ``(index, values, seconds)`` per item as each finishes; ``values`` is a ``Crash``
        when the item raised something unexpected (the model is then reloaded: an edit may be
        half applied)."""
        if task_id != self.task_id:
            self.session.close()
            self.session = ExitStack()
            self.session.enter_context(task.session(self.model))
            self.task_id = task_id
        if getattr(task, "items_per_call", 1) > 1 and len(batch) > 1:
            batch = yield from self._together(task, batch)
        for index, item in batch:
            started = time.perf_counter()
            try:
                values = task.compute(self.model, item)
            except TracekitError as err:  # bad input at this point: stored as failed, as run_sweep does
                values = {"status": f"failed: {err}"}
            except Exception as err:  # noqa: BLE001 - the driver retries it elsewhere, then records it
                values = Crash(f"{type(err).__name__}: {err} (at {_where(err)})")
                self._reload()
            yield index, values, time.perf_counter() - started
            if isinstance(values, Crash):
                return  # the rest of the batch goes back to the driver's queue

    def _together(self, task, batch: list[tuple[int, SweepItem]]):
        """Yield what ``task.compute_many`` computes for ``batch`` (items of several points edited
        together: batched v*, one scoring pass); return the items it did not finish, which then
        run one by one so that an error is pinned on its own item."""
        index_of = {id(item): index for index, item in batch}
        done, started = set(), time.perf_counter()
        try:
            for item, values in task.compute_many(self.model, [item for _, item in batch]):
                now = time.perf_counter()
                done.add(index_of[id(item)])
                yield index_of[id(item)], values, now - started
                started = now
        except Exception:  # noqa: BLE001 - redone item by item below, where the error is recorded
            self._reload()  # an edit may be half applied
        return [(index, item) for index, item in batch if index not in done]


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
