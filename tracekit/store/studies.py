"""The paper's two sweeps over a dataset, written into a result store item by item.

    trace_study(model, records, store, kinds=("mlp",), windows=(5,))
    edit_study(model, records, store, methods=("rome", "ft-1"), problems=("error-injection",), layers=[...])

Both resume (finished items are skipped), shard (``shard=Shard(k, N)``) and record their
settings in the store's manifest. The tracer and the editor are arguments (defaults: the
library's ``tracekit.tracing.trace`` / ``zero_trace`` and ``tracekit.editing.api.edit``), so
tests and other tools can drive the same sweep with their own functions.
"""

from __future__ import annotations

import functools
import json
from typing import Callable, Sequence

from tracekit.data.records import FactRecord
from tracekit.errors import TracekitError
from tracekit.store.db import ResultStore
from tracekit.store.manifest import model_identity
from tracekit.store.sweep import Shard, SweepItem, SweepReport, run_sweep

TRACE_KINDS = ("mlp", "attn", "resid", "zero")  # "zero": representation zeroing of the MLP output


def point_seed(seed: int, case_id: int) -> int:
    """Each point gets its own noise draws, reproducible from the sweep's seed."""
    return seed + int(case_id)


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


def preset_layer(model) -> int | None:
    """The editing presets' default ROME layer for this model (None where there is no preset)."""
    try:
        from tracekit.editing.presets import rome_preset

        return rome_preset(model).layer
    except (ImportError, TracekitError):
        return None


def _default_tracers():
    from tracekit.tracing import trace, zero_trace

    return trace, zero_trace


def trace_study(model, records: Sequence[FactRecord], store: ResultStore, *, kinds=("mlp",), windows=(5,),
                samples: int = 10, noise="s3", seed: int = 0, shard: Shard | None = None,
                trace_fn: Callable | None = None, zero_fn: Callable | None = None,
                progress: bool = True) -> SweepReport:
    """Trace every (point, kind, window) not yet in the store; o_true is the traced target."""
    for kind in kinds:
        if kind not in TRACE_KINDS:
            raise TracekitError(f"unknown trace kind {kind!r}; choose from {', '.join(TRACE_KINDS)}")
    for window in windows:
        if not 1 <= window <= model.n_layers:
            raise TracekitError(f"window {window} does not fit {model.spec}'s {model.n_layers} layers; use 1..{model.n_layers}")
    if trace_fn is None or zero_fn is None:
        default_trace, default_zero = _default_tracers()
        trace_fn, zero_fn = trace_fn or default_trace, zero_fn or default_zero
    model_id = model_identity(model)
    store.begin("trace", {"model": model_id, "samples": samples, "noise": str(noise), "seed": seed,
                          "point_seed": "seed + case_id", "target": "target_true"}, seed)
    items = [SweepItem(dict(model=model_id, dataset=r.source, case_id=r.case_id, kind=kind, window=window), r)
             for r in records for kind in kinds for window in windows]

    def work(item: SweepItem) -> dict:
        r: FactRecord = item.payload
        kind, window = item.key["kind"], item.key["window"]
        if kind == "zero":
            result = zero_fn(model, r.text, r.subject, r.target_true, kind="mlp", window=window)
            return dict(status="ok", p_clean=result.p_clean, p_noise=None, effect_max=_floats(result.effect_by_layer()),
                        effect_last=None, result=_json(result))
        result = trace_fn(model, r.text, r.subject, r.target_true, kind=kind, window=window, samples=samples,
                          noise=noise, seed=point_seed(seed, r.case_id))
        try:
            last = _floats(result.effect_by_layer("last_subject"))
        except TracekitError:
            last = None
        return dict(status="ok", p_clean=result.p_clean, p_noise=result.p_noise,
                    effect_max=_floats(result.effect_by_layer("max")), effect_last=last, result=_json(result))

    return run_sweep(store, "traces", items, work=work, shard=shard, progress=progress, description="tracing")


def edit_study(model, records: Sequence[FactRecord], store: ResultStore, *, methods=("rome",),
               problems=("error-injection",), layers: Sequence[int], default_layer: int | None = None,
               hparams=None, seed: int = 0, shard: Shard | None = None,
               edit_fn: Callable | None = None, progress: bool = True) -> SweepReport:
    """Edit every (point, method, problem, layer) not yet in the store and keep all its scores.

    ``hparams``: None uses the editing presets for the model, method and problem. The noise seed
    of a point (Fact Forcing, Tracing Reversal) is ``seed + case_id``, as in ``trace_study``.
    Items run point by point so per-point preparation is shared. A point that does not qualify
    for a problem (Fact Erasure with p(o_true) < 0.02, ...) is stored as "skipped: <reason>".
    """
    if not layers:
        raise TracekitError("no edit layers given")
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad:
        raise TracekitError(f"edit layers {bad} are outside 0..{model.n_layers - 1} for {model.spec}")
    if edit_fn is None:
        from tracekit.editing.api import edit, warm_key_statistics

        # MEMIT's and FT-5's windows are cut at the model's edges, as tracing windows are
        edit_fn = functools.partial(edit, clip_window=True)
        warm_key_statistics(model, methods, layers, hparams, progress=progress, clip_window=True,
                            problems=problems)  # cached: cheap when done
    model_id = model_identity(model)
    store.begin("edit", {"model": model_id, "hparams": "presets" if hparams is None else repr(hparams), "seed": seed,
                         "point_seed": "seed + case_id", "default_layer": default_layer}, seed)
    items = [SweepItem(dict(model=model_id, dataset=r.source, case_id=r.case_id, method=method, problem=problem,
                            layer=layer), r)
             for r in records for problem in problems for method in methods for layer in layers]

    def work(item: SweepItem) -> dict:
        r: FactRecord = item.payload
        try:
            result = edit_fn(model, r, method=item.key["method"], problem=item.key["problem"],
                             layer=item.key["layer"], hparams=hparams, seed=point_seed(seed, r.case_id))
        except TracekitError as err:
            if type(err).__name__ == "PointSkipped":  # tracekit.editing.problems.PointSkipped
                return dict(status=f"skipped: {err}")
            raise
        change = getattr(result, "edit", None)
        if getattr(change, "applied", False):  # leave the model as we found it for the next item
            change.undo()
        scores = getattr(result.scores, "scores", result.scores)  # EditScores or a plain dict
        return dict(status="ok", scores={k: float(v) for k, v in dict(scores).items() if _scalar(v)},
                    result=_json(result))

    from tracekit.editing.metrics import baseline_cached

    with baseline_cached(model):  # safe: every item undoes its edit before the next is scored
        return run_sweep(store, "edits", items, work=work, shard=shard, progress=progress, description="editing")


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
