"""Resumable, shardable sweeps: compute each missing item, write it the moment it is done.

    items = [SweepItem({"model": m, "dataset": "counterfact", "case_id": 7, ...}, record), ...]
    run_sweep(store, "edits", items, work=lambda item: {...values...}, shard=Shard.parse("2/8"))

``--shard k/N`` (k = 0..N-1) keeps the items whose *point* hashes to k modulo N: a stable
hash (sha256 of the case id), so every process, machine and scheduler agrees on the split
without talking to the others, all items of one point land in one shard (its known-fact
verdict and any per-point preparation are made once), and adding points never moves old ones.

``--shard shared`` splits the work as it goes instead: processes on one machine writing one store
each claim the next items nobody holds (``tracekit.store.claims``), so none idles while another
has work left.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from tracekit.errors import TracekitError
from tracekit.store.db import TABLES, ResultStore
from tracekit.store.manifest import canonical_json


def stable_hash(value) -> int:
    return int(hashlib.sha256(canonical_json(value).encode()).hexdigest()[:16], 16)


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise TracekitError(f"bad shard {self.index}/{self.count}: use k/N with 0 <= k < N "
                                f"(e.g. --shard $SLURM_ARRAY_TASK_ID/{max(self.count, 1)})")

    @classmethod
    def parse(cls, text: str | None) -> "Shard | SharedShard | None":
        if text is None or text == "":
            return None
        if text == "shared":
            return SharedShard()
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise TracekitError(f"bad --shard {text!r}: write k/N, e.g. 0/4 for the first of four shards, "
                                f"or 'shared'") from None
        return cls(index, count)

    def owns(self, value) -> bool:
        return stable_hash(value) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class SharedShard:
    """``--shard shared``: every item is this process's to take, once no other process sharing the
    store has claimed it (``run_sweep`` claims each batch before computing it)."""

    def owns(self, value) -> bool:
        return True

    def __str__(self) -> str:
        return "shared"


@dataclass
class SweepItem:
    key: dict  # the table's key columns
    payload: Any = None  # what the work function needs (a FactRecord, say)


@dataclass
class SweepReport:
    total: int = 0  # items asked for
    owned: int = 0  # in this shard
    already_done: int = 0
    computed: int = 0
    skipped: int = 0  # stored as "skipped: <reason>" by the work function (the point does not qualify)
    failed: list[tuple[dict, str]] = field(default_factory=list)
    retried: int = 0  # items sent again after their worker died or they raised (distributed executors)
    elsewhere: int = 0  # items another process sharing the store took (--shard shared)

    def summary(self) -> str:
        text = f"{self.computed} computed, {self.already_done} already done, "
        text += f"{self.owned} in this shard of {self.total}" if self.owned < self.total else f"{self.total} in all"
        text += f", {self.skipped} skipped (point does not qualify)" if self.skipped else ""
        text += f", {self.retried} retried on another worker" if self.retried else ""
        text += f", {self.elsewhere} taken by another process" if self.elsewhere else ""
        return text + (f", {len(self.failed)} failed (stored with their reason)" if self.failed else "")


def point_of(key: dict):
    return key["case_id"]


def select_items(store: ResultStore, table: str, items: Sequence[SweepItem], *, shard: Shard | None = None,
                 shard_by: Callable[[dict], Any] = point_of) -> tuple[SweepReport, list[SweepItem]]:
    """The items of this shard that the store lacks (in the order given), and a report that counts them."""
    key_columns = TABLES[table].key
    report = SweepReport(total=len(items))
    owned = [item for item in items if shard is None or shard.owns(shard_by(item.key))]
    report.owned = len(owned)
    done = store.done_keys(table)
    todo = [item for item in owned if tuple(item.key[c] for c in key_columns) not in done]
    report.already_done = len(owned) - len(todo)
    return report, todo


STOP_AFTER_FAILURES = 5


class ResultWriter:
    """Writes each finished item once, counts it in the report, and stops a sweep whose first
    items all fail (a setup problem, not bad points) before storing any of them."""

    def __init__(self, store: ResultStore, table: str, report: SweepReport):
        self.store, self.table, self.report = store, table, report
        self.held: list[tuple[SweepItem, dict]] = []  # failures before any success: maybe a setup error

    def write(self, item: SweepItem, values: dict) -> None:
        status = str(values.get("status", "ok"))
        if status.startswith("failed") and self.report.computed + self.report.skipped == 0:
            self.held.append((item, values))
            if len(self.held) >= STOP_AFTER_FAILURES:
                _stop(self.report)
            return
        for held_item, held_values in self.held:  # something works, so those were point failures
            self.store.put(self.table, held_item.key, held_values)
        self.held.clear()
        if self.store.put(self.table, item.key, values) and not status.startswith("failed"):
            if status.startswith("skipped"):
                self.report.skipped += 1
            else:
                self.report.computed += 1

    def fail(self, item: SweepItem, reason: str) -> None:
        """Record ``item`` as failed with ``reason`` (it is stored, unless every item so far failed)."""
        self.report.failed.append((item.key, reason))
        self.write(item, {"status": f"failed: {reason}"})

    def close(self) -> None:
        if self.held:
            _stop(self.report)


def sweep_progress(progress: bool, total: int, description: str, status: str = "") -> tuple[Progress, Any]:
    """A rich bar: done/total, items per second, elapsed and remaining time, and a status text."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}")]
    bar = Progress(*columns, disable=not progress or not total, transient=False)
    task = bar.add_task(description, total=total, rate="", status=status)
    return bar, task


def advance(bar: Progress, task, status: str | None = None) -> None:
    bar.advance(task)
    speed = bar.tasks[task].speed if bar.tasks else None  # rich's rate over its recent samples
    fields = {"rate": f"{speed:.2f} items/s" if speed else ""}
    if status is not None:
        fields["status"] = status
    bar.update(task, **fields)


def run_sweep(store: ResultStore, table: str, items: Sequence[SweepItem], *,
              work: Callable[[SweepItem], dict] | None = None,
              work_many: Callable[[list[SweepItem]], Iterable[tuple[SweepItem, dict]]] | None = None,
              batch_size: int = 1, shard: Shard | SharedShard | None = None, shard_by: Callable[[dict], Any] = point_of,
              progress: bool = True, description: str | None = None) -> SweepReport:
    """Compute every item of this shard that the store lacks, writing each result as it comes.

    ``work(item)`` returns the table's value columns for one item; or ``work_many(items)`` yields
    ``(item, values)`` as results finish (batched kernels). A ``TracekitError`` raised for an item
    (bad input at that point) is stored as status "failed: ..." and the sweep goes on; any other
    exception stops it (rerun to resume). Items are processed in the order given, in this process
    (``tracekit.studies`` spreads a study over a Ray cluster); with ``shard=SharedShard()``, those
    that no other process sharing the store has claimed.
    """
    if (work is None) == (work_many is None):
        raise TracekitError("give exactly one of work= or work_many=")
    if work is not None:
        work_many = lambda batch: ((item, work(item)) for item in batch)  # noqa: E731
    report, todo = select_items(store, table, items, shard=shard, shard_by=shard_by)
    writer = ResultWriter(store, table, report)
    shared = isinstance(shard, SharedShard)
    batches = _claimed_batches(store, table, todo, batch_size) if shared else _batches(todo, batch_size)
    bar, task = sweep_progress(progress, len(todo), description or table)
    try:
        with bar:
            for batch, taken in batches:
                report.elsewhere += taken
                bar.advance(task, taken)
                for item, values in _guarded(work_many, batch, writer) if batch else ():
                    writer.write(item, values)
                    advance(bar, task)
            writer.close()
    finally:
        if shared:
            from tracekit.store.claims import release_claims

            release_claims(store)
    return report


def _batches(todo: list[SweepItem], size: int) -> Iterator[tuple[list[SweepItem], int]]:
    """``todo`` in slices of ``size``, with nothing taken by other processes."""
    size = max(1, size)
    for start in range(0, len(todo), size):
        yield todo[start:start + size], 0


def _claimed_batches(store: ResultStore, table: str, todo: list[SweepItem],
                     size: int) -> Iterator[tuple[list[SweepItem], int]]:
    """The next items of ``todo`` that this process could claim, ``size`` at a time, and how many
    it passed over because another process holds or has stored them."""
    from tracekit.store.claims import claim

    size, at = max(1, size), 0
    while at < len(todo):
        batch, taken = [], 0
        while at < len(todo) and len(batch) < size:
            candidates = todo[at:at + size - len(batch)]
            at += len(candidates)
            for item, granted in zip(candidates, claim(store, table, [c.key for c in candidates])):
                if granted:
                    batch.append(item)
                else:
                    taken += 1
        yield batch, taken


def _stop(report: SweepReport):
    """Every item so far failed: a setup problem, not bad points. Store nothing and say why."""
    reasons = sorted({reason for _, reason in report.failed})
    raise TracekitError(f"the first {len(report.failed)} item(s) all failed, so the sweep stopped without storing "
                        f"them: {'; '.join(reasons[:2])}")


def _guarded(work_many, batch: list[SweepItem], writer: ResultWriter) -> Iterator[tuple[SweepItem, dict]]:
    """Results of a batch; on a TracekitError, redo the unfinished items one by one to name the bad one."""
    finished: set[int] = set()
    try:
        for item, values in work_many(batch):
            finished.add(id(item))
            yield item, values
        return
    except TracekitError as err:
        if len(batch) == 1:
            writer.report.failed.append((batch[0].key, str(err)))
            yield batch[0], {"status": f"failed: {err}"}
            return
    for item in batch:
        if id(item) not in finished:
            yield from _guarded(work_many, [item], writer)


def print_report(report: SweepReport, store: ResultStore, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{store.path}[/bold]: {report.summary()}", highlight=False)
    for key, reason in report.failed[:5]:
        console.print(f"  [yellow]failed[/yellow] {key}: {reason}", highlight=False)
    if len(report.failed) > 5:
        console.print(f"  ... and {len(report.failed) - 5} more (rerun with --retry-failed to try them again)")


def shard_from_env(text: str | None) -> Shard | None:
    """``--shard`` may be left out under a Slurm array: TRACEKIT_SHARD, e.g. "3/16", is read instead."""
    return Shard.parse(text if text is not None else os.environ.get("TRACEKIT_SHARD"))
