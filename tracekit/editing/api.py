"""``tracekit.edit``: one fact, one method, one problem -> the Edit and its scores."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tracekit.data.loaders import parse_record
from tracekit.editing.delta import Edit
from tracekit.editing.finetune import FTHyperParams, apply_ft
from tracekit.editing.kv_batch import default_batch
from tracekit.editing.metrics import EditScores, MetricsConfig, evaluate_edit, evaluate_edits
from tracekit.editing.presets import ft_preset, memit_preset, rome_preset
from tracekit.editing.problems import EditSetup, Problem, prepare, setup_from_request
from tracekit.editing.request import EditRequest
from tracekit.errors import TracekitError, check
from tracekit.prompts import warn_if_inside_word

METHODS = ("rome", "memit", "ft-1", "ft-5")


@dataclass
class EditResult:
    edit: Edit  # not applied unless ``edit(..., leave_applied=True)``
    method: str
    problem: str | None
    layer: int
    layers: list[int]  # every layer whose weights change
    hparams: Any
    setup: EditSetup
    scores: EditScores | None  # None when evaluate=False
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def request(self) -> EditRequest:
        return self.setup.request

    def row(self) -> dict[str, Any]:
        """A flat, JSON-friendly record of this result (config and all scores)."""
        out: dict[str, Any] = {
            "method": self.method, "problem": self.problem, "layer": self.layer, "layers": list(self.layers),
            "prompt": self.request.prompt, "subject": self.request.subject, "target": self.request.target,
            "o_true": self.setup.o_true, "hparams": _plain(self.hparams),
            "problem_convention": self.setup.convention, **self.setup.noise,
            **{f"seconds_{k}": v for k, v in self.seconds.items()},
        }
        info = self.edit.info
        if info is not None:
            out["steps_taken"] = info.steps_taken
            out.update({k: v for k, v in info.conventions.items()})
            if info.noise:
                out.update(info.noise)
        if self.scores is not None:
            out.update(self.scores.scores)
            out["scoring"] = self.scores.scoring
            rewrite = [r for r in self.scores.rows if r.kind == "rewrite" and r.role == "target"]
            if rewrite:
                out["p_target_before"], out["p_target_after"] = rewrite[0].p_before, rewrite[0].p_after
        return out


def _plain(hparams) -> Any:
    return dataclasses.asdict(hparams) if dataclasses.is_dataclass(hparams) else hparams


def parse_method(method: str) -> str:
    key = str(method).strip().lower().replace("_", "-")
    key = {"ft1": "ft-1", "ft5": "ft-5"}.get(key, key)
    check(key in METHODS, f"unknown edit method {method!r}; choose one of {', '.join(METHODS)}")
    return key


def edit(model, record_or_request, method: str = "rome", problem: str | Problem = "error-injection",
         layer: int | None = None, hparams=None, evaluate: bool = True, *, seed: int = 0, noise="s3",
         metrics: MetricsConfig = MetricsConfig(), leave_applied: bool = False,
         clip_window: bool | None = None, convention: str = "paper-code") -> EditResult:
    """Edit one fact and (by default) score it.

    ``record_or_request``: a ``tracekit.data.FactRecord`` (or a raw record of any dataset format),
    turned into a request by ``problem``; or a bare ``EditRequest`` (scored on its own
    prompt only). ``layer=None`` takes the preset's default layer for this model.
    The model is returned unchanged unless ``leave_applied``; apply the edit with
    ``result.edit.apply()`` or ``with result.edit: ...``. ``clip_window``: overrides the
    hparams' choice for MEMIT and FT-5 windows that pass the model's first or last layer.
    ``convention``: how the problems pick o_noise and noise the subject ("paper-code", the
    paper's code, or "tracekit"; ``tracekit.editing.problems``); ``noise``: the noise rule
    (its scale is recorded in ``result.row()``).
    """
    method = parse_method(method)
    if isinstance(record_or_request, EditRequest):
        setup = setup_from_request(record_or_request)
    else:
        if isinstance(record_or_request, dict):  # a raw dataset record, in whichever format
            record_or_request = parse_record(record_or_request)
        noised_rows = 10 if method in ("ft-1", "ft-5") else 1  # the paper code's num_noise_samples
        setup = prepare(model, record_or_request, problem, seed=seed, noise=noise, convention=convention,
                        noised_rows=noised_rows)
    request = setup.request
    warn_if_inside_word(request.text, request.subject, request.prompt.index("{}"))
    problem_name = None if setup.problem is None else setup.problem.value
    if hparams is None:
        hparams = default_hparams(model, method, setup.problem or Problem.ERROR_INJECTION)
    if clip_window is not None and hasattr(hparams, "clip_window"):
        hparams = dataclasses.replace(hparams, clip_window=clip_window)
    layer = _pick_layer(model, layer, hparams)
    started = time.perf_counter()
    the_edit = _dispatch(model, method, setup.request, layer, hparams)
    seconds = {"edit": time.perf_counter() - started}
    scores = None
    if evaluate:
        started = time.perf_counter()
        scores = evaluate_edit(model, setup, the_edit, metrics)
        seconds["evaluate"] = time.perf_counter() - started
    if leave_applied:
        the_edit.apply()
    layers = the_edit.info.layers if the_edit.info is not None else [layer]
    return EditResult(the_edit, method, problem_name, layer, list(layers), hparams, setup, scores, seconds)


def edit_many(model, records: Sequence, method: str = "rome", problem: str | Problem = "error-injection",
              layer: int | None = None, hparams=None, evaluate: bool = True, *, seeds: Sequence[int] | None = None,
              noise="s3", metrics: MetricsConfig = MetricsConfig(), clip_window: bool | None = None,
              convention: str = "paper-code", batch: int | None = None, score_batch: int | None = None) -> list:
    """``edit`` of several points with one method, problem and layer, the work batched: v* of
    ``batch`` requests optimised together (ROME, MEMIT), or their fine-tuning in shared passes
    (FT; ``finetune_batch``), and the scoring's "after" passes of ``score_batch`` points in one
    pass (``metrics.evaluate_edits``); default batch: ``kv_batch.default_batch`` for the model's
    device, default score_batch: batch. (On a CPU, FT tuned 8 at a time but scored one by one is
    the fastest: padding several points' prompts to one length costs more than it saves there.)
    Each edit is computed on the unedited model, exactly as ``edit`` one by one (up to
    floating-point reassociation, <= 1e-5).

    Returns one entry per record: its ``EditResult``, or the ``TracekitError`` (e.g.
    ``PointSkipped``) that ``edit`` would have raised for it. ``seeds``: one per record (default 0)."""
    method = parse_method(method)
    records = list(records)
    seeds = [0] * len(records) if seeds is None else list(seeds)
    check(len(seeds) == len(records), f"{len(seeds)} seeds for {len(records)} records")
    out: list = [None] * len(records)
    setups = {}
    for i, (record, seed) in enumerate(zip(records, seeds)):
        try:
            if isinstance(record, EditRequest):
                setups[i] = setup_from_request(record)
            else:
                record = parse_record(record) if isinstance(record, dict) else record
                setups[i] = prepare(model, record, problem, seed=seed, noise=noise, convention=convention,
                                    noised_rows=10 if method in ("ft-1", "ft-5") else 1)
            request = setups[i].request
            warn_if_inside_word(request.text, request.subject, request.prompt.index("{}"))
        except TracekitError as err:
            out[i] = err
    ready = sorted(setups)
    batch = default_batch(model.device) if batch is None else batch
    check(isinstance(batch, int) and batch >= 1, f"batch must be a positive integer, got {batch!r}")
    score_batch = batch if score_batch is None else score_batch
    check(isinstance(score_batch, int) and score_batch >= 1,
          f"score_batch must be a positive integer, got {score_batch!r}")
    for at in range(0, len(ready), batch):
        chunk = ready[at:at + batch]
        problem_of = setups[chunk[0]].problem or Problem.ERROR_INJECTION
        hp = default_hparams(model, method, problem_of) if hparams is None else hparams
        if clip_window is not None and hasattr(hp, "clip_window"):
            hp = dataclasses.replace(hp, clip_window=clip_window)
        at_layer = _pick_layer(model, layer, hp)
        requests = [setups[i].request for i in chunk]
        started = time.perf_counter()
        if method == "rome":
            from tracekit.editing.rome import rome_edits

            edits = rome_edits(model, requests, at_layer, hp, batch=batch)
        elif method == "memit":
            from tracekit.editing.memit import memit_edits

            edits = memit_edits(model, requests, at_layer, hp, batch=batch)
        elif len(chunk) > 1:  # fine-tuning: the noise-free requests tuned together
            from tracekit.editing.finetune_batch import apply_ft_many

            edits = apply_ft_many(model, requests, at_layer, _ft_hparams(method, hp))
        else:
            edits = [_dispatch(model, method, r, at_layer, hp) for r in requests]
        edit_seconds = (time.perf_counter() - started) / len(chunk)
        scores = [None] * len(chunk)
        score_seconds = 0.0
        if evaluate:
            started = time.perf_counter()
            if score_batch == 1:  # as ``edit`` scores: the edit applied to the weights
                scores = [evaluate_edit(model, setups[i], e, metrics, keep_points=len(chunk))
                          for i, e in zip(chunk, edits)]
            else:
                scores = []
                for k in range(0, len(chunk), score_batch):
                    scores += evaluate_edits(model, [setups[i] for i in chunk[k:k + score_batch]],
                                             edits[k:k + score_batch], metrics, keep_points=len(chunk))
            score_seconds = (time.perf_counter() - started) / len(chunk)
        for i, the_edit, point_scores in zip(chunk, edits, scores):
            seconds = {"edit": edit_seconds, **({"evaluate": score_seconds} if evaluate else {}), "batch": len(chunk)}
            layers = the_edit.info.layers if the_edit.info is not None else [at_layer]
            problem_name = None if setups[i].problem is None else setups[i].problem.value
            out[i] = EditResult(the_edit, method, problem_name, at_layer, list(layers), hp, setups[i], point_scores,
                                seconds)
    return out


def edit_sequentially(model, requests: Sequence[EditRequest], method: str = "rome", layer: int | None = None,
                      hparams=None, *, templates=None, progress: bool = True, second_moment=None) -> Edit:
    """Sequential editing: each request's edit is computed on the weights the earlier ones left,
    and applied, one after another; returns ONE Edit from the original weights to the final
    ones (not applied; the model is left as found). ROME and MEMIT read the key statistics of
    the original model throughout, as the public code does (they are computed once, up front;
    ``second_moment``: C given instead, as for ``apply_rome``)."""
    from tracekit.editing.info import EditInfo
    from tracekit.editing.memit import apply_memit, memit_layers
    from tracekit.editing.rome import apply_rome, key_statistics, resolve_layer

    method = parse_method(method)
    requests = list(requests)
    check(len(requests) > 0 and all(isinstance(r, EditRequest) for r in requests), "give a list of EditRequests")
    hp = default_hparams(model, method, Problem.ERROR_INJECTION) if hparams is None else hparams
    started = time.perf_counter()
    kwargs = {}
    if method in ("rome", "memit"):
        at = resolve_layer(model, layer, hp)
        layers = [at] if method == "rome" else memit_layers(model, at, hp.window, hp.clip_window)
        stats, _ = key_statistics(model, layers, hp, second_moment, progress)
        kwargs = dict(templates=templates, progress=progress, second_moment={x: s.matrix for x, s in stats.items()})
    applied: list[Edit] = []
    try:
        for request in requests:
            if method == "rome":
                one = apply_rome(model, request, layer, hp, **kwargs)
            elif method == "memit":
                one = apply_memit(model, request, layer, hp, **kwargs)
            else:
                one = _dispatch(model, method, request, _pick_layer(model, layer, hp), hp)
            applied.append(one.apply())
        params = dict(model.hf.named_parameters())
        final = {name: params[name].detach().clone() for e in applied for name in e.parameter_names}
    finally:
        for one in reversed(applied):
            one.undo()
    infos = [e.info for e in applied]
    info = EditInfo(method=f"{method} (sequential)", layers=sorted({x for i in infos for x in i.layers}),
                    seconds={"total": time.perf_counter() - started}, steps_taken=sum(i.steps_taken for i in infos),
                    losses=[], final_nll=infos[-1].final_nll, engine=infos[-1].engine,
                    conventions=infos[-1].conventions, details={"requests": len(requests),
                                                                "edits": [i.row() for i in infos]})
    return Edit(model.hf, final, info, model=model)


def default_hparams(model, method: str, problem: Problem):
    """The preset for this model, method and problem (FT here; ROME/MEMIT in ``hparams``)."""
    method = parse_method(method)
    if method in ("ft-1", "ft-5"):
        return ft_preset(model, problem.value, 1 if method == "ft-1" else 5)
    return (rome_preset if method == "rome" else memit_preset)(model, problem.value)


def _pick_layer(model, layer: int | None, hparams) -> int:
    if layer is None:
        layer = getattr(hparams, "layer", None)
    if layer is None:  # a preset without a default layer: the middle of the model
        layer = model.n_layers // 2
    check(isinstance(layer, int) and not isinstance(layer, bool), f"layer must be an integer, got {layer!r}")
    model.adapter.check_layer(model.hf, layer)
    return layer


def _ft_hparams(method: str, hparams) -> FTHyperParams:
    want = 1 if method == "ft-1" else 5
    check(isinstance(hparams, FTHyperParams), f"{method} needs FTHyperParams, got {type(hparams).__name__}")
    check(hparams.n_layers == want, f"{method} edits {want} layer(s) but the hparams say n_layers={hparams.n_layers}")
    return hparams


def _dispatch(model, method: str, request: EditRequest, layer: int, hparams) -> Edit:
    if method in ("ft-1", "ft-5"):
        return apply_ft(model, request, layer, _ft_hparams(method, hparams))
    if method == "rome":
        from tracekit.editing.rome import apply_rome as apply_method
    else:
        from tracekit.editing.memit import apply_memit as apply_method
    return apply_method(model, request, layer, hparams)


def warm_key_statistics(model, methods, layers, hparams=None, progress: bool = True,
                        clip_window: bool | None = None, problems=("error-injection",)) -> list[int]:
    """Compute the key statistics every ROME/MEMIT edit of a sweep will read, in one pass over
    the corpus (one pass per layer costs up to ``len(layers)`` times more). Returns the layers."""
    return sorted({s.layer for s in _key_statistics(model, methods, layers, hparams, progress, clip_window, problems)})


def key_statistics_files(model, methods, layers, hparams=None, progress: bool = True,
                         clip_window: bool | None = None, problems=("error-injection",)) -> list:
    """As ``warm_key_statistics``, but returns the cache files that hold the statistics (so a
    sweep on several machines can hand them to workers that cannot read this one's cache)."""
    return sorted({s.path for s in _key_statistics(model, methods, layers, hparams, progress, clip_window, problems)
                   if s.path is not None})


def _key_statistics(model, methods, layers, hparams, progress, clip_window, problems) -> list:
    from tracekit.editing.covariance import second_moments
    from tracekit.editing.memit import memit_layers

    needed: dict[tuple, set[int]] = {}  # per statistics setting: the layers
    for method in {parse_method(m) for m in methods} & {"rome", "memit"}:
        for problem in {Problem.parse(p) for p in problems}:
            hp = hparams if hparams is not None else default_hparams(model, method, problem)
            for layer in layers:
                try:
                    span = [layer] if method == "rome" else memit_layers(
                        model, layer, hp.window, hp.clip_window if clip_window is None else clip_window)
                except TracekitError:
                    continue  # this item will report its own error
                key = (hp.mom2_n_samples, hp.mom2_sample_tokens, hp.mom2_dtype, hp.corpus)
                needed.setdefault(key, set()).update(span)
    found = []
    for (n_samples, sample_tokens, dtype, corpus), wanted in needed.items():
        found += second_moments(model, sorted(wanted), n_samples=n_samples, sample_tokens=sample_tokens, dtype=dtype,
                                corpus=corpus, progress=progress).values()
    return found


def nan_to_none(scores: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in scores.items()}
