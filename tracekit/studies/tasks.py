"""The work of one study item, as small picklable objects that any executor can run.

A task knows its table, how to turn records into keyed items, what to prepare once per
model (``prepare``: key statistics), what to hold open while a worker computes
(``session``: cached baselines) and how to compute one item. It holds settings only, never
a model, so the same task runs in this process (``LocalExecutor``) or is shipped to Ray
workers that loaded their own copy of the model (``RayExecutor``).
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from tracekit.errors import TracekitError

if TYPE_CHECKING:  # light at import: `tracekit --help` reads TRACE_KINDS without loading torch
    from tracekit.data.records import FactRecord
    from tracekit.store.sweep import SweepItem

TRACE_KINDS = ("mlp", "attn", "resid", "zero")  # "zero": representation zeroing of the MLP output
KEY_STATISTICS_METHODS = ("rome", "memit")  # they whiten their update by C = E[k k^T]


def point_seed(seed: int, case_id: int) -> int:
    """Each point gets its own noise draws, reproducible from the sweep's seed."""
    return seed + int(case_id)


@dataclass(frozen=True)
class TraceTask:
    """Causal traces (and zeroing) of every (point, kind, window); o_true is the traced target."""

    kinds: tuple[str, ...] = ("mlp",)
    windows: tuple[int, ...] = (5,)
    samples: int = 10
    noise: Any = "s3"
    seed: int = 0
    trace_fn: Callable | None = None  # default: tracekit.tracing.trace
    zero_fn: Callable | None = None  # default: tracekit.tracing.zero_trace
    # points traced together (trace_many: their rows packed into shared passes); 1: item by item.
    # Not part of the config: the results are the same (<= 1e-5) whatever the batch.
    batch: int = 1

    table = "traces"
    sweep = "trace"
    description = "tracing"

    def check(self, n_layers: int, spec: str) -> None:
        for kind in self.kinds:
            if kind not in TRACE_KINDS:
                raise TracekitError(f"unknown trace kind {kind!r}; choose from {', '.join(TRACE_KINDS)}")
        for window in self.windows:
            if not 1 <= window <= n_layers:
                raise TracekitError(f"window {window} does not fit {spec}'s {n_layers} layers; use 1..{n_layers}")

    def config(self, model_id: str) -> dict:
        return {"model": model_id, "samples": self.samples, "noise": str(self.noise), "seed": self.seed,
                "point_seed": "seed + case_id", "target": "target_true"}

    def items(self, model_id: str, records: Sequence[FactRecord]) -> list[SweepItem]:
        from tracekit.store.sweep import SweepItem

        return [SweepItem(dict(model=model_id, dataset=r.source, case_id=r.case_id, kind=kind, window=window), r)
                for r in records for kind in self.kinds for window in self.windows]

    def needs_prepare(self, item: SweepItem) -> bool:
        return False

    def prepare(self, model, progress: bool = False) -> list[Path]:
        return []

    def session(self, model):
        return contextlib.nullcontext()

    @property
    def items_per_call(self) -> int:
        """Items an executor hands ``compute_many`` at once (1: ``compute`` item by item)."""
        return max(1, self.batch) if self.trace_fn is None and self.zero_fn is None else 1

    def compute_many(self, model, items: Sequence[SweepItem]):
        """Yield (item, values) for ``items``, those of one (kind, window) traced together
        (``trace_many``, each point with its own seed). A point that fails is left out and its
        error raised at the end, so the sweep redoes the unfinished items one by one and names it."""
        from tracekit.tracing import trace_many

        groups: dict[tuple, list[SweepItem]] = {}
        for one in items:
            groups.setdefault((one.key["kind"], one.key["window"]), []).append(one)
        failure = None
        for (kind, window), group in groups.items():
            records = [one.payload for one in group]
            if kind == "zero":
                results = trace_many(model, records, zeroing=True, kind="mlp", window=window, progress=False,
                                     errors="yield", batch=len(group))
            else:
                results = trace_many(model, records, kind=kind, window=window, samples=self.samples, noise=self.noise,
                                     seeds=[point_seed(self.seed, r.case_id) for r in records], progress=False,
                                     errors="yield", batch=len(group))
            for one, (_, result) in zip(group, results):
                if isinstance(result, Exception):
                    failure = failure or result
                else:
                    yield one, self._values(kind, result)
        if failure is not None:
            raise failure

    def compute(self, model, item: SweepItem) -> dict:
        r: FactRecord = item.payload
        kind, window = item.key["kind"], item.key["window"]
        trace_fn, zero_fn = self.trace_fn, self.zero_fn
        if trace_fn is None or zero_fn is None:
            from tracekit.tracing import trace, zero_trace

            trace_fn, zero_fn = trace_fn or trace, zero_fn or zero_trace
        if kind == "zero":
            return self._values(kind, zero_fn(model, r.text, r.subject, r.target_true, kind="mlp", window=window))
        return self._values(kind, trace_fn(model, r.text, r.subject, r.target_true, kind=kind, window=window,
                                           samples=self.samples, noise=self.noise,
                                           seed=point_seed(self.seed, r.case_id)))

    @staticmethod
    def _values(kind: str, result) -> dict:
        if kind == "zero":
            return dict(status="ok", p_clean=result.p_clean, p_noise=None, effect_max=_floats(result.effect_by_layer()),
                        effect_last=None, result=_json(result))
        try:
            last = _floats(result.effect_by_layer("last_subject"))
        except TracekitError:
            last = None
        return dict(status="ok", p_clean=result.p_clean, p_noise=result.p_noise,
                    effect_max=_floats(result.effect_by_layer("max")), effect_last=last, result=_json(result))


@dataclass(frozen=True)
class EditTask:
    """Edits of every (point, method, problem, layer), each scored and undone before the next.

    ``hparams``: None (the editing presets for each model, method and problem), one
    hyperparameter object for every method, or a mapping method -> hyperparameters.
    """

    methods: tuple[str, ...] = ("rome",)
    problems: tuple[str, ...] = ("error-injection",)
    layers: tuple[int, ...] = ()
    hparams: Any = None
    seed: int = 0
    default_layer: int | None = None
    edit_fn: Callable | None = None  # default: tracekit.editing.api.edit (MEMIT/FT-5 windows clipped)
    metrics: Any = None  # a tracekit.editing.metrics.MetricsConfig; None: the default scoring
    # points edited together (api.edit_many: batched v*, one scoring pass); 1: item by item.
    # Not part of the config: the results are the same (<= 1e-5) whatever the batch.
    batch: int = 1
    score_batch: int | None = None  # of a batch, points scored in one pass (None: all)
    # how the problems noise the subject and pick o_noise (tracekit.editing.subject_noise): the paper
    # code's (its fresh draw per pass) or tracekit's single draw; in the config only when not the default,
    # so stores made before the option resume as they are
    convention: str = "paper-code"

    table = "edits"
    sweep = "edit"
    description = "editing"

    def check(self, n_layers: int, spec: str) -> None:
        from tracekit.editing.subject_noise import check_convention

        check_convention(self.convention)
        if not self.layers:
            raise TracekitError("no edit layers given")
        bad = [layer for layer in self.layers if not 0 <= layer < n_layers]
        if bad:
            raise TracekitError(f"edit layers {bad} are outside 0..{n_layers - 1} for {spec}")

    def config(self, model_id: str) -> dict:
        hparams = "presets" if self.hparams is None else repr(self.hparams)
        config = {"model": model_id, "hparams": hparams, "seed": self.seed, "point_seed": "seed + case_id",
                  "default_layer": self.default_layer}
        if self.convention != "paper-code":
            config["convention"] = self.convention
        return config if self.metrics is None else {**config, "metrics": repr(self.metrics)}

    def items(self, model_id: str, records: Sequence[FactRecord]) -> list[SweepItem]:
        from tracekit.store.sweep import SweepItem

        def item(r, problem, method, layer):
            return SweepItem(dict(model=model_id, dataset=r.source, case_id=r.case_id, method=method, problem=problem,
                                  layer=layer), r)

        # point by point, so a point's preparation (its baseline, its essence texts) is shared; batched:
        # ``batch`` points at a time, each (problem, method, layer) for all of them in a row
        step, records = self.items_per_call, list(records)
        return [item(r, problem, method, layer)
                for at in range(0, len(records), step) for problem in self.problems for method in self.methods
                for layer in self.layers for r in records[at:at + step]]

    def hparams_for(self, method: str):
        return self.hparams.get(method) if isinstance(self.hparams, Mapping) else self.hparams

    def needs_prepare(self, item: SweepItem) -> bool:
        """Does this item read key statistics (ROME, MEMIT with the library's editor)?"""
        from tracekit.editing.api import parse_method

        return self.edit_fn is None and parse_method(item.key["method"]) in KEY_STATISTICS_METHODS

    def prepare(self, model, progress: bool = False) -> list[Path]:
        """Compute the key statistics every ROME/MEMIT item will read, in one pass over the corpus
        per statistics setting; returns their cache files (for workers that cannot see this
        machine's cache)."""
        from tracekit.editing.api import key_statistics_files, parse_method

        methods = [m for m in self.methods if parse_method(m) in KEY_STATISTICS_METHODS]
        if self.edit_fn is not None or not methods:
            return []
        # one hyperparameter object (or the presets): one call, so methods sharing settings share a pass
        groups = [(m, self.hparams_for(m)) for m in methods] if isinstance(self.hparams, Mapping) else [
            (methods, self.hparams)]
        files: list[Path] = []
        for group, hparams in groups:
            files += key_statistics_files(model, [group] if isinstance(group, str) else group, self.layers, hparams,
                                          progress=progress, clip_window=True, problems=self.problems)
        return sorted(set(files))

    def session(self, model):
        if self.edit_fn is not None:
            return contextlib.nullcontext()
        from tracekit.editing.metrics import baseline_cached

        return baseline_cached(model)  # safe: every item undoes its edit before the next is scored

    @property
    def items_per_call(self) -> int:
        """Items an executor hands ``compute_many`` at once (1: ``compute`` item by item)."""
        return max(1, self.batch) if self.edit_fn is None else 1

    def compute_many(self, model, items: Sequence[SweepItem]):
        """Yield (item, values) for ``items``, those sharing (method, problem, layer) edited together
        (``api.edit_many``). An item whose point raised an error other than "skipped" is left out and the
        error raised at the end, so the sweep redoes the unfinished items one by one and names it."""
        from tracekit.editing.api import edit_many
        from tracekit.editing.problems import PointSkipped

        if self.items_per_call == 1 or len(items) == 1:
            for one in items:
                yield one, self.compute(model, one)
            return
        groups: dict[tuple, list[SweepItem]] = {}
        for one in items:
            groups.setdefault((one.key["method"], one.key["problem"], one.key["layer"]), []).append(one)
        failure = None
        for (method, problem, layer), group in groups.items():
            kwargs = {} if self.metrics is None else {"metrics": self.metrics}
            results = edit_many(model, [one.payload for one in group], method=method, problem=problem, layer=layer,
                                hparams=self.hparams_for(method), seeds=[point_seed(self.seed, one.payload.case_id)
                                                                         for one in group],
                                clip_window=True, batch=len(group), score_batch=self.score_batch,
                                convention=self.convention, **kwargs)
            for one, result in zip(group, results):
                if isinstance(result, PointSkipped):
                    yield one, dict(status=f"skipped: {result}")
                elif isinstance(result, Exception):
                    failure = failure or result
                else:
                    yield one, self._values(result)
        if failure is not None:
            raise failure

    def compute(self, model, item: SweepItem) -> dict:
        from tracekit.editing.problems import PointSkipped

        r: FactRecord = item.payload
        method = item.key["method"]
        edit_fn = self.edit_fn
        if edit_fn is None:
            from tracekit.editing.api import edit

            edit_fn = functools.partial(edit, clip_window=True)  # windows cut at the model's edges, as in tracing
        if self.metrics is not None:
            edit_fn = functools.partial(edit_fn, metrics=self.metrics)
        if self.convention != "paper-code":  # a caller's edit_fn need not know the option
            edit_fn = functools.partial(edit_fn, convention=self.convention)
        try:
            result = edit_fn(model, r, method=method, problem=item.key["problem"], layer=item.key["layer"],
                             hparams=self.hparams_for(method), seed=point_seed(self.seed, r.case_id))
        except PointSkipped as err:
            return dict(status=f"skipped: {err}")
        change = getattr(result, "edit", None)
        if getattr(change, "applied", False):  # leave the model as we found it for the next item
            change.undo()
        return self._values(result)

    @staticmethod
    def _values(result) -> dict:
        scores = getattr(result.scores, "scores", result.scores)  # EditScores or a plain dict
        return dict(status="ok", scores={k: float(v) for k, v in dict(scores).items() if _scalar(v)},
                    result=_json(result))


def _floats(values) -> list[float]:
    return [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def _scalar(value) -> bool:
    return isinstance(value, (int, float, bool)) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0)


def _json(result) -> str | None:
    """The full result as JSON text: its ``to_json()`` (traces) or ``row()`` (edits), else its scores."""
    if hasattr(result, "to_json"):
        text = result.to_json()
        return text if isinstance(text, str) else json.dumps(text)
    if hasattr(result, "row"):
        return json.dumps(result.row(), default=str)
    scores = getattr(result, "scores", None)
    scores = getattr(scores, "scores", scores)
    return json.dumps({"scores": dict(scores)}, default=str) if scores is not None else None
