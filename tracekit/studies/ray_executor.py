"""A study spread over a Ray cluster: one actor per worker, the driver the store's only writer.

    with RayExecutor(ModelSource("EleutherAI/gpt-j-6B", dtype="float16"), address="auto",
                     gpus_per_worker=1) as pool:
        edit_study(pool.model, records, store, methods=METHODS, problems=PROBLEMS, layers=layers)

- Each worker (a Ray actor) loads the model from its spec or path once and keeps it, with its
  caches (context templates, key statistics, per-point baselines), for the whole sweep.
- The driver hands out batches (one point's items by default: they share per-point work; a
  task that edits N points together, ``EditTask(batch=N)``, gets N points and runs them with
  ``compute_many``),
  receives each item's values the moment the worker yields them (Ray streaming generators)
  and writes them to the result store. Items already stored are never sent; a rerun resumes.
- A worker that dies (killed, out of memory, its machine gone) loses only what it had not yet
  yielded: those items go back to the queue for another worker, and a new worker replaces it.
  The item it was computing is the suspect: after ``max_attempts`` deaths (or exceptions) on
  it, it is stored as "failed: <error>" instead of being retried forever.
- Key statistics are computed once, by one worker, before any edit. Workers on the same
  machine (or sharing $TRACEKIT_CACHE on a shared filesystem) read its cache files; a worker
  that cannot see them receives the files through Ray's object store, once per machine.
- ``pool.model`` (a ``RemoteModel``) tells the driver the model's identity, depth and preset
  layer and runs the known-fact filter's generation on a worker, so the driver never loads
  the model itself.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tracekit.errors import TracekitError
from tracekit.store.db import ResultStore
from tracekit.store.sweep import (ResultWriter, Shard, SharedShard, SweepItem, SweepReport, advance, point_of,
                                  select_items, sweep_progress)
from tracekit.studies.executors import ModelCard, ModelSource

from tracekit.studies.ray_worker import INSTALL_HINT, Crash, StudyWorker, import_ray  # noqa: F401 (re-exported)


# ---- the driver --------------------------------------------------------------------------------
@dataclass
class Worker:
    index: int
    actor: Any
    ready_ref: Any
    info: dict | None = None  # what ready() said: card, pid, node, device
    runs: list["Run"] = field(default_factory=list)  # in dispatch order (an actor runs them in that order)
    task_files_ok: str | None = None  # task id whose cache files this worker is known to have


@dataclass
class Batch:
    entries: list[tuple[int, SweepItem]]
    avoid: frozenset = frozenset()  # workers this batch should not go back to
    needs_prepare: bool = False  # waits for the task's preparation (key statistics)


@dataclass
class Run:
    worker: Worker
    batch: Batch
    pending: list[int]  # indices not yet received, in order
    generator: Any


class RemoteModel:
    """The driver's view of the model the workers hold: spec, depth, identity, preset layer,
    and ``generate`` (run on a worker) for the known-fact filter."""

    def __init__(self, card: ModelCard, executor: "RayExecutor"):
        self.card, self.executor = card, executor
        self.spec, self.n_layers, self.model_identity = card.spec, card.n_layers, card.identity

    @property
    def device_type(self) -> str:
        """The workers' device type ("cuda" or "cpu"): what the default batch sizes go by."""
        return self.card.device_type

    def generate(self, prompts, max_new_tokens: int = 20, batch_size: int = 32, top_k: int | None = None,
                 seed: int = 0) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, top_k=top_k, seed=seed)
        return self.executor.call_one("generate", prompts, kwargs)

    def __repr__(self) -> str:
        return f"RemoteModel({self.spec!r} on {len(self.executor.ready_workers())} Ray workers)"


class RayExecutor:
    """Runs a study's items on Ray actors; see the module docstring. Use as a context manager.

    ``address``: None (RAY_ADDRESS, else a cluster started by `ray start` here, else a new local
    instance), "auto", or "ray://host:10001". ``workers``: None takes every GPU (or, on a
    CPU-only cluster, every CPU) the cluster has, divided by what one worker needs.
    ``gpus_per_worker`` may be a fraction (two small models per GPU: 0.5). ``worker_env``:
    environment variables for the workers; "{worker}" in a value becomes the worker's number.
    """

    def __init__(self, source: ModelSource, *, address: str | None = None, workers: int | None = None,
                 gpus_per_worker: float | None = None, cpus_per_worker: float = 1, points_per_batch: int = 1,
                 max_attempts: int = 3, worker_env: dict[str, str] | None = None, runtime_env: dict | None = None,
                 start_timeout: float = 1800.0, init_kwargs: dict | None = None):
        if workers is not None and workers < 1:
            raise TracekitError(f"--workers must be at least 1, got {workers}")
        if points_per_batch < 1 or max_attempts < 1:
            raise TracekitError("points per batch and max attempts must be at least 1")
        self.ray = import_ray()
        self.source, self.address = source, address
        self.cpus_per_worker, self.points_per_batch, self.max_attempts = cpus_per_worker, points_per_batch, max_attempts
        self.worker_env, self.runtime_env = dict(worker_env or {}), dict(runtime_env or {})
        self.start_timeout = start_timeout
        self.started_ray = False
        if not self.ray.is_initialized():
            kwargs = {"log_to_driver": False, **(init_kwargs or {})}
            try:
                self.ray.init(address=address, **kwargs)
            except (ConnectionError, TimeoutError) as err:
                raise TracekitError(f"no Ray cluster at --address {address}: {err}; start one with `ray start --head` "
                                    "(docs/cluster.md), or leave --address out for a Ray instance on this machine") from None
            self.started_ray = True
        try:
            self._start(workers, gpus_per_worker, cpus_per_worker)
        except BaseException:
            self.close()
            raise

    def _start(self, workers: int | None, gpus_per_worker: float | None, cpus_per_worker: float) -> None:
        self.workers: list[Worker] = []
        resources = self.ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
        self.gpus_per_worker = (1 if gpus else 0) if gpus_per_worker is None else gpus_per_worker
        if self.gpus_per_worker > gpus or cpus_per_worker > cpus:
            raise TracekitError(f"a worker needs {self.gpus_per_worker} GPU(s) and {cpus_per_worker} CPU(s), but the Ray "
                                f"cluster has {gpus:g} GPU(s) and {cpus:g} CPU(s); lower --gpus-per-worker or add machines")
        if workers is None:
            workers = int(gpus // self.gpus_per_worker) if self.gpus_per_worker else int(cpus // max(cpus_per_worker, 1e-9))
        self.n_workers = max(1, workers)
        self.max_replacements = 2 * self.n_workers + 2
        self.deaths: list[str] = []
        self._numbers = itertools.count()
        self._actor_class = self.ray.remote(StudyWorker)
        self._card: ModelCard | None = None
        self._file_refs: dict[str, Any] = {}
        self.stats = Counter()  # items, compute seconds, retries, files shipped (for measurements)
        for _ in range(self.n_workers):
            self._start_worker()

    # ---- lifecycle ----
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker.actor, no_restart=True)
        self.workers = []
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False

    def _start_worker(self) -> Worker:
        number = next(self._numbers)
        env = {k: str(v).replace("{worker}", str(number)) for k, v in self.worker_env.items()}
        runtime_env = dict(self.runtime_env)
        if env:
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
        options = dict(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0,
                       max_task_retries=0)
        if runtime_env:
            options["runtime_env"] = runtime_env
        actor = self._actor_class.options(**options).remote(self.source)
        worker = Worker(number, actor, actor.ready.remote())
        self.workers.append(worker)
        return worker

    def ready_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.info is not None]

    def worker_pids(self) -> dict[int, int]:
        """Process id of each ready worker (tests kill one)."""
        return {w.index: w.info["pid"] for w in self.ready_workers()}

    def _accept_ready(self, worker: Worker, info: dict) -> None:
        if info["error"]:
            self._drop(worker)
            raise TracekitError(f"a Ray worker could not load {self.source.spec}: {info['error']}")
        card: ModelCard = info["card"]
        if self._card is None:
            self._card = card
        elif card.identity != self._card.identity:
            raise TracekitError(f"the worker on {info['node']} loaded a different model ({card.identity}, others "
                                f"{self._card.identity}): use the same model files and versions on every machine")
        worker.info = info

    def _drop(self, worker: Worker) -> None:
        self.ray.kill(worker.actor, no_restart=True)
        self.workers.remove(worker)

    def _died(self, worker: Worker, err: BaseException) -> None:
        """Forget a dead worker and start another in its place (while deaths stay few)."""
        self.deaths.append(f"worker {worker.index}: {type(err).__name__}")
        if worker in self.workers:
            self._drop(worker)
        if len(self.deaths) > self.max_replacements:
            raise TracekitError(f"Ray workers died {len(self.deaths)} times ({'; '.join(self.deaths[-3:])}); "
                                "see the Ray logs (/tmp/ray/session_latest/logs) for why")
        self._start_worker()

    def _wait_ready(self, timeout: float) -> None:
        """Take in the workers that finished loading (waiting up to ``timeout`` for the first one)."""
        deadline = time.monotonic() + timeout
        while True:
            starting = {w.ready_ref: w for w in self.workers if w.info is None}
            if not starting:
                return
            if self.ready_workers():  # take whoever is ready now, wait for nobody
                done, _ = self.ray.wait(list(starting), num_returns=len(starting), timeout=0)
            else:  # wait for the first one
                done, _ = self.ray.wait(list(starting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in done:
                worker = starting[ref]
                try:
                    self._accept_ready(worker, self.ray.get(ref))
                except self.ray.exceptions.RayActorError as err:
                    self._died(worker, err)
            if self.ready_workers() or time.monotonic() >= deadline:
                if not self.ready_workers():
                    raise TracekitError(f"no Ray worker was ready after {timeout:.0f} s; is the cluster big enough "
                                        f"for {self.gpus_per_worker} GPU(s) and {self.cpus_per_worker} CPU(s) per worker?")
                return

    @property
    def model(self) -> RemoteModel:
        self._wait_ready(self.start_timeout)
        return RemoteModel(self._card, self)

    def call_one(self, method: str, *args):
        """Call ``method`` on one ready worker; on a worker's death, on another."""
        for _ in range(self.max_attempts):
            self._wait_ready(self.start_timeout)
            worker = min(self.ready_workers(), key=lambda w: len(w.runs))
            try:
                return self.ray.get(getattr(worker.actor, method).remote(*args))
            except self.ray.exceptions.RayActorError as err:
                self._died(worker, err)
            except self.ray.exceptions.RayTaskError as err:
                raise _unwrap(err) from None
        raise TracekitError(f"{method} failed on {self.max_attempts} Ray workers in a row: {'; '.join(self.deaths[-3:])}")

    # ---- the sweep ----
    def run(self, task, store: ResultStore, items: Sequence[SweepItem], *, shard: Shard | None = None,
            shard_by: Callable[[dict], Any] = point_of, progress: bool = True) -> SweepReport:
        if isinstance(shard, SharedShard):
            raise TracekitError("--shard shared splits the work between processes on one machine; the Ray "
                                "executor already spreads it over the cluster's workers: drop --shard")
        report, todo = select_items(store, task.table, items, shard=shard, shard_by=shard_by)
        if not todo:
            return report
        return _Sweep(self, task, store, report, todo, shard_by, progress).run()

    def _files_for(self, worker: Worker, task_id: str, files: list[str]) -> None:
        """Give ``worker`` the task's cache files it cannot see, through the object store (once per
        file: every worker that lacks it reads the same object). Workers on one machine, or
        sharing $TRACEKIT_CACHE on a shared filesystem, lack none."""
        if not files or worker.task_files_ok == task_id:
            return
        missing = self.ray.get(worker.actor.missing.remote(files))
        holders = [w for w in self.ready_workers() if w.task_files_ok == task_id and w is not worker]
        for name in missing if holders else []:  # no holder left: the worker computes what it lacks
            if name not in self._file_refs:
                self._file_refs[name] = holders[0].actor.read_file.remote(name)
            worker.actor.install.remote(name, self._file_refs[name])  # runs before its next batch
            self.stats["files shipped"] += 1
        worker.task_files_ok = task_id


def _unwrap(err):
    """A TracekitError raised on a worker, as itself (one line for the user); else the Ray error."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, TracekitError) else err


class _Sweep:
    """One run of the driver loop: dispatch batches, take results as they come, write them.

    The task's preparation (key statistics) runs on one worker while the others take the
    items that do not need it (FT edits); the items that do wait until it is done.
    """

    def __init__(self, executor: RayExecutor, task, store: ResultStore, report: SweepReport,
                 todo: list[SweepItem], shard_by, progress: bool):
        self.ex, self.ray, self.task = executor, executor.ray, task
        self.task_id = f"{time.time_ns()}-{os.getpid()}"
        self.report, self.todo = report, todo
        self.writer = ResultWriter(store, task.table, report)
        needs = [task.needs_prepare(item) for item in todo]
        # a task that edits several points together (EditTask(batch=N)) gets at least N points per batch
        points = max(executor.points_per_batch, getattr(task, "items_per_call", 1))
        self.queue: deque[Batch] = deque(_batches(todo, needs, shard_by, points))
        self.files: list[str] | None = None if any(needs) else []  # None: preparation not done yet
        self.preparing: tuple[Worker, Any] | None = None
        self.prepare_tries = 0
        self.attempts: Counter = Counter()
        self.runs: dict[Any, Run] = {}
        self.bar, self.bar_task = sweep_progress(progress, len(todo), task.description, self._status())

    def _status(self) -> str:
        ready = len(self.ex.ready_workers())
        text = f"{ready}/{self.ex.n_workers} workers"
        text += f" · worker {self.preparing[0].index} computing key statistics" if self.preparing else ""
        text += f" · {self.report.retried} retried" if self.report.retried else ""
        return text + (f" · {len(self.report.failed)} failed" if self.report.failed else "")

    def run(self) -> SweepReport:
        with self.bar:
            while self.queue or self.runs or self.preparing:
                self.ex._wait_ready(self.ex.start_timeout if not (self.runs or self.preparing) else 0)
                if self.files is None and self.preparing is None:
                    self._start_prepare()
                self._dispatch()
                self._receive()
            self.writer.close()
        return self.report

    # ---- preparation ----
    def _start_prepare(self) -> None:
        self.prepare_tries += 1
        if self.prepare_tries > self.ex.max_attempts:
            raise TracekitError(f"preparing the sweep (key statistics) failed on {self.ex.max_attempts} Ray workers: "
                                f"{'; '.join(self.ex.deaths[-3:])}")
        worker = min(self.ex.ready_workers(), key=lambda w: len(w.runs))
        self.preparing = (worker, worker.actor.prepare.remote(self.task))  # runs after the worker's queued batches
        self.bar.update(self.bar_task, status=self._status())

    def _prepared(self) -> None:
        worker, ref = self.preparing
        self.preparing = None
        try:
            self.files = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            raise _unwrap(err) from None
        except self.ray.exceptions.RayError as err:  # the worker died: another one prepares
            self._worker_died(worker, err)
            return
        worker.task_files_ok = self.task_id
        self.bar.update(self.bar_task, status=self._status())

    # ---- handing out batches ----
    def _dispatch(self) -> None:
        """Every idle worker gets a batch first; then each gets a second one to start on as soon
        as the first is done (no idle gap waiting for the driver)."""
        for depth in (1, 2):
            for worker in sorted(self.ex.ready_workers(), key=lambda w: len(w.runs)):
                if self.preparing and self.preparing[0] is worker:
                    continue
                try:
                    if self.files:
                        self.ex._files_for(worker, self.task_id, self.files)
                except self.ray.exceptions.RayError as err:
                    self._worker_died(worker, err)
                    continue
                while self.queue and len(worker.runs) < depth:
                    batch = self._next_batch_for(worker)
                    if batch is None:
                        break
                    generator = worker.actor.run.options(num_returns="streaming").remote(self.task_id, self.task,
                                                                                         batch.entries)
                    run = Run(worker, batch, [index for index, _ in batch.entries], generator)
                    worker.runs.append(run)
                    self.runs[generator] = run

    def _next_batch_for(self, worker: Worker) -> Batch | None:
        others = len(self.ex.ready_workers()) > 1
        for i, batch in enumerate(self.queue):
            if batch.needs_prepare and self.files is None:
                continue
            if worker.index not in batch.avoid or not others:
                del self.queue[i]
                return batch
        return None

    # ---- taking results ----
    def _receive(self) -> None:
        waiting = list(self.runs) + [w.ready_ref for w in self.ex.workers if w.info is None]
        if self.preparing:
            waiting.append(self.preparing[1])
        if not waiting:
            return
        done, _ = self.ray.wait(waiting, num_returns=1, timeout=1.0)
        for ready in done:
            if self.preparing and ready is self.preparing[1]:
                self._prepared()
                continue
            run = self.runs.get(ready)
            if run is None:
                continue  # a worker finished loading (taken in by the next _wait_ready), or a run already closed
            try:
                ref = next(ready)
            except StopIteration:
                self._finished(run)
                continue
            try:
                index, values, seconds = self.ray.get(ref)
            except self.ray.exceptions.RayError as err:  # the worker died (or broke): it is replaced
                self._worker_died(run.worker, err)
                continue
            run.pending.remove(index)
            item = self.todo[index]
            if isinstance(values, Crash):
                self._retry(index, run.worker, values.error)
                self._requeue(run.pending, run.worker, count=False)  # the worker stopped this batch there
                run.pending = []
                continue
            self.ex.stats["items"] += 1
            self.ex.stats["compute seconds"] += seconds
            if str(values.get("status", "")).startswith("failed"):
                self.report.failed.append((item.key, values["status"].removeprefix("failed: ")))
            self.writer.write(item, values)
            advance(self.bar, self.bar_task, self._status())

    def _finished(self, run: Run) -> None:
        del self.runs[run.generator]
        run.worker.runs.remove(run)
        if run.pending:  # stopped early (a crash) or cut short: nothing may be lost
            self._requeue(run.pending, run.worker, count=False)

    # ---- faults ----
    def _worker_died(self, worker: Worker, err: BaseException) -> None:
        """Requeue everything sent to ``worker`` and not received; its current item is the suspect."""
        suspect = True
        for run in list(worker.runs):
            del self.runs[run.generator]
            if run.pending and suspect:
                self._retry(run.pending[0], worker, f"its Ray worker died ({type(err).__name__})")
                run.pending = run.pending[1:]
                suspect = False
            self._requeue(run.pending, worker, count=True)
        worker.runs.clear()
        if self.preparing and self.preparing[0] is worker:
            self.preparing = None  # started again on another worker by the loop
        self.ex._file_refs.clear()  # they may have lived on the dead worker's machine
        self.ex._died(worker, err)
        self.bar.update(self.bar_task, status=self._status())

    def _retry(self, index: int, worker: Worker, error: str) -> None:
        """Send one item again, to another worker, unless it has failed ``max_attempts`` times."""
        self.attempts[index] += 1
        if self.attempts[index] >= self.ex.max_attempts:
            self.writer.fail(self.todo[index], f"{error} ({self.attempts[index]} attempts)")
            advance(self.bar, self.bar_task, self._status())
            return
        self.report.retried += 1
        self.queue.appendleft(self._batch([index], worker))

    def _requeue(self, indices: list[int], worker: Worker, count: bool) -> None:
        if not indices:
            return
        if count:
            self.report.retried += len(indices)
        self.queue.appendleft(self._batch(indices, worker))

    def _batch(self, indices: list[int], worker: Worker) -> Batch:
        needs = any(self.task.needs_prepare(self.todo[i]) for i in indices)
        return Batch([(i, self.todo[i]) for i in indices], frozenset({worker.index}), needs)


def _batches(todo: list[SweepItem], needs: list[bool], shard_by, points_per_batch: int) -> list[Batch]:
    """Consecutive items of the same point(s) go together (they share the point's preparation),
    those that need the task's preparation apart from those that do not."""
    groups: list[list[int]] = []
    last = object()
    for index, item in enumerate(todo):
        point = shard_by(item.key)
        if point != last:
            groups.append([])
            last = point
        groups[-1].append(index)
    batches: list[Batch] = []
    for start in range(0, len(groups), points_per_batch):
        indices = [i for group in groups[start:start + points_per_batch] for i in group]
        for flag in (False, True):
            part = [(i, todo[i]) for i in indices if needs[i] == flag]
            if part:
                batches.append(Batch(part, frozenset(), flag))
    return batches
