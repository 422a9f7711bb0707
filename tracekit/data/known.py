"""The paper's known-fact filter: keep a point when the model's greedy continuation of the
prompt (36 tokens) contains o_true (Hase et al. 2023, appendix A: GPT-J keeps 32.6%).

Generation (``Model.generate``, batched) is the slow part, so the verdicts are cached per
model identity (spec + weight fingerprint, see ``tracekit.identity.model_identity``)
in any object with ``get_known`` / ``put_known`` (a ``ResultStore`` is one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

from rich.progress import Progress

from tracekit.data.records import FactRecord
from tracekit.errors import check
from tracekit.identity import model_identity

if TYPE_CHECKING:  # for annotations only: no import cycle, no early torch
    from tracekit.models import Model

KNOWN_NEW_TOKENS = 36


class KnownCache(Protocol):
    def get_known(self, model_id: str, records: Sequence[FactRecord], new_tokens: int) -> dict[int, bool]: ...
    def put_known(self, model_id: str, rows: Iterable[tuple[FactRecord, bool, str]], new_tokens: int) -> None: ...


def is_known(continuation: str, target_true: str) -> bool:
    """o_true (without its leading space) appears in the greedy continuation."""
    return target_true.strip() in continuation


def known_flags(model: Model, records: Sequence[FactRecord], *, cache: KnownCache | None = None,
                new_tokens: int = KNOWN_NEW_TOKENS, batch_size: int = 32, progress: bool = True) -> list[bool]:
    """For each record, whether the model knows it; cached verdicts are reused, new ones cached."""
    check(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
    model_id = model_identity(model)
    flags: dict[int, bool] = dict(cache.get_known(model_id, records, new_tokens)) if cache is not None else {}
    todo = [r for r in records if r.case_id not in flags]
    with Progress(disable=not progress or not todo, transient=True) as bar:
        task = bar.add_task(f"known-fact filter ({new_tokens} greedy tokens)", total=len(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            continuations = model.generate([r.text for r in chunk], max_new_tokens=new_tokens)
            rows = [(r, is_known(c, r.target_true), c) for r, c in zip(chunk, continuations)]
            if cache is not None:  # written per batch: an interrupted filter resumes where it stopped
                cache.put_known(model_id, rows, new_tokens)
            flags.update({r.case_id: known for r, known, _ in rows})
            bar.advance(task, len(chunk))
    return [flags[r.case_id] for r in records]


def filter_known(model: Model, records: Sequence[FactRecord], *, limit: int | None = None,
                 cache: KnownCache | None = None, new_tokens: int = KNOWN_NEW_TOKENS,
                 batch_size: int = 32, progress: bool = True) -> list[FactRecord]:
    """The known records, in dataset order; with ``limit``, the first ``limit`` of them
    (generating only as far into the data as needed)."""
    check(limit is None or limit >= 1, f"limit must be at least 1, got {limit}")
    kept: list[FactRecord] = []
    step = len(records) if limit is None else max(batch_size, 2 * limit)
    for start in range(0, len(records), step):
        chunk = records[start:start + step]
        flags = known_flags(model, chunk, cache=cache, new_tokens=new_tokens, batch_size=batch_size,
                            progress=progress)
        kept += [r for r, known in zip(chunk, flags) if known]
        if limit is not None and len(kept) >= limit:
            return kept[:limit]
    check(limit is None or len(kept) >= limit,
          f"only {len(kept)} of {len(records)} records are known to the model, fewer than the {limit} asked for; "
          f"load more records or lower the limit")
    return kept
