"""Public entry points: ``trace``, ``zero_trace``, ``trace_many``, ``noised_prediction``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from tracekit.adapters import Site
from tracekit.errors import TracekitError, check
from tracekit.tracing import engine as E
from tracekit.tracing.noise import noise_scale, scaled_noise, subject_noise_hook
from tracekit.tracing.plan import Prompt, Settings, Unanswered, record_fields, tokenise_prompt, window_layers
from tracekit.tracing.result import TraceResult, ZeroResult


def _engine(model, requested: str) -> str:
    """"fast" runs on every backend now (the partial forward decides how); "auto" picks it."""
    return "fast" if requested == "auto" else requested


def _run(model, jobs: list[E.Job], engine: str, batch_tokens: int | None, shapes: str | None):
    with torch.no_grad():
        if engine == "fast":
            return E.run_jobs(model, jobs, batch_tokens=batch_tokens, shapes=shapes)
        return [E.run_generic(model, job, batch_tokens) for job in jobs]


def _clean_runs(model, prompts: list[Unanswered], kind: str | None, shapes: str | None):
    """One clean pass for every prompt: its last-position logits [V] and (``kind`` given) the clean
    value of the traced site at every layer, [1, T, d] per layer."""
    lengths = torch.tensor([p.input_ids.shape[1] for p in prompts])
    ids = torch.cat([E.pad_ids(p.input_ids, int(lengths.max())) for p in prompts])
    sites = [] if kind is None else [Site(kind, layer) for layer in range(model.n_layers)]
    out = model.forward(ids, capture=sites, logits=lengths - 1, shapes=shapes)
    return [(out.logits[i], [out.captured[s][i:i + 1, :n].detach() for s in sites])
            for i, n in enumerate(lengths.tolist())]


def _clean(model, prompt, kind: str, shapes: str | None = None) -> tuple[float, list[torch.Tensor]]:
    """p_clean and the clean value of the traced site at every layer [1, T, d]."""
    ((logits, states),) = _clean_runs(model, [prompt], kind, shapes)
    return float(torch.softmax(logits.float(), -1)[prompt.answer_id]), states


def _trace_rows(positions: list[int], n_layers: int, window: int, samples: int, length: int) -> E.Rows:
    cells = [(t, window_layers(layer, window, n_layers)) for t in positions for layer in range(n_layers)]
    edit_pos = torch.zeros(len(cells), length, dtype=torch.bool)
    edit_pos[torch.arange(len(cells)), torch.tensor([t for t, _ in cells])] = True
    lo = torch.tensor([w.start for _, w in cells])
    hi = torch.tensor([w.stop for _, w in cells])
    each = lambda x: x.repeat_interleave(samples, dim=0)  # noqa: E731 - rows are (cell, sample)
    return E.Rows(torch.arange(samples).repeat(len(cells)), each(lo), each(hi), each(edit_pos))


@dataclass
class _Checked:
    """One record's checked arguments and tokenised prompt: no forward pass run yet."""

    prompt: Unanswered
    settings: Settings
    zeroing: bool
    noise_draws: torch.Tensor | None = None


@dataclass
class _Prepared:
    """One prompt's work, ready for the engine, and what its result needs besides."""

    prompt: Prompt
    settings: Settings
    positions: list[int]
    p_clean: float
    job: E.Job
    engine: str
    target: str | None
    zeroing: bool
    noise_given: bool = False


def _check_trace(model, prompt, subject, target=None, kind="mlp", window=10, samples=10, noise="s3", tokens="all",
                 seed=0, noise_draws=None, engine="auto", shapes=None, occurrence=None) -> _Checked:
    if noise_draws is not None:
        noise_draws = torch.as_tensor(noise_draws)
        samples = int(noise_draws.shape[0]) if noise_draws.ndim == 3 else samples
    settings = Settings.make(model.n_layers, kind=kind, window=window, samples=samples, noise=noise, seed=seed,
                             tokens=tokens, engine=engine)
    return _Checked(tokenise_prompt(model, prompt, subject, target, occurrence), settings, False, noise_draws)


def _check_zero(model, prompt, subject, target=None, kind="mlp", window=10, tokens="subject", engine="auto",
                shapes=None, occurrence=None) -> _Checked:
    settings = Settings.make(model.n_layers, kind=kind, window=window, tokens=tokens, engine=engine, zeroing=True)
    return _Checked(tokenise_prompt(model, prompt, subject, target, occurrence), settings, True)


def _prepare(model, checked: list[_Checked], shapes: str | None) -> list[_Prepared | TracekitError]:
    """Clean runs of every checked prompt in one pass, then each prompt's rows and noise."""
    kind = None if checked[0].zeroing else checked[0].settings.kind
    out: list[_Prepared | TracekitError] = []
    for item, (logits, clean) in zip(checked, _clean_runs(model, [c.prompt for c in checked], kind, shapes)):
        try:
            out.append(_prepare_one(model, item, logits, clean))
        except TracekitError as err:
            out.append(err)
    return out


def _prepare_one(model, item: _Checked, logits: torch.Tensor, clean: list[torch.Tensor]) -> _Prepared:
    settings, p = item.settings, item.prompt.answered(model, logits)
    p_clean = float(torch.softmax(logits.float(), -1)[p.answer_id])
    positions = p.positions(settings.tokens)
    chosen = _engine(model, settings.engine)
    L = model.n_layers
    if item.zeroing:
        windows = [window_layers(layer, settings.window, L) for layer in range(L)]
        edit_pos = torch.zeros(L, p.length, dtype=torch.bool)
        edit_pos[:, positions] = True
        rows = E.Rows(torch.zeros(L, dtype=torch.long), torch.tensor([w.start for w in windows]),
                      torch.tensor([w.stop for w in windows]), edit_pos)
        job = E.Job(p.input_ids, p.answer_id, settings.kind, rows, None, None)
        return _Prepared(p, settings, positions, p_clean, job, chosen, item.prompt.target, True)
    start, end = p.span
    draws = scaled_noise(model, settings.samples, end - start, settings.noise, settings.seed, draws=item.noise_draws)
    rows = _trace_rows(positions, L, settings.window, settings.samples, p.length)
    job = E.Job(p.input_ids, p.answer_id, settings.kind, rows, clean, draws, start)
    return _Prepared(p, settings, positions, p_clean, job, chosen, item.prompt.target, False,
                     item.noise_draws is not None)


def _finish(model, prep: _Prepared, p_rows: torch.Tensor, p_base: torch.Tensor) -> TraceResult | ZeroResult:
    settings = prep.settings
    if prep.zeroing:
        p = prep.prompt
        config = {**settings.as_dict(), "engine": prep.engine, "backend": model.backend.name,
                  "n_layers": model.n_layers}
        for unused in ("samples", "noise", "seed"):
            config.pop(unused)
        if prep.engine == "fast":
            config["forward"] = model.forward_path
        return ZeroResult(model=model.spec, prompt=p.text, subject=p.subject, tokens=list(p.tokens),
                          subject_span=tuple(p.span), answer=p.answer, answer_id=p.answer_id, target=prep.target,
                          p_clean=prep.p_clean, config=config, positions=prep.positions, p_zero=p_rows)
    p_restore = p_rows.view(len(prep.positions), model.n_layers, settings.samples).mean(-1)
    result = TraceResult.build(model, prep.prompt, settings, prep.positions, prep.p_clean, float(p_base.mean()),
                               p_restore, engine=prep.engine, noise_scale=noise_scale(model, settings.noise),
                               target=prep.target)
    result.config["noise_draws"] = "given" if prep.noise_given else "seeded"
    if prep.engine == "fast":
        result.config["forward"] = model.forward_path
    return result


def _one(model, checked: _Checked, batch_tokens, shapes):
    (prep,) = _prepare(model, [checked], shapes)
    if isinstance(prep, TracekitError):
        raise prep
    ((p_rows, p_base),) = _run(model, [prep.job], prep.engine, batch_tokens, shapes)
    return _finish(model, prep, p_rows, p_base)


def trace(model, prompt: str, subject: str, target: str | None = None, kind: str = "mlp", window: int = 10,
          samples: int = 10, noise="s3", tokens="all", seed: int = 0, noise_draws=None,
          batch_tokens: int | None = None, engine: str = "auto", shapes: str | None = None,
          occurrence: int | None = None) -> TraceResult:
    """Causal tracing of one prompt (method-notes "Causal tracing").

    Noise the subject's token embeddings (``samples`` seeded draws, the same for every
    restoration, or ``noise_draws`` [samples, subject tokens, d_model], scaled by the
    ``noise`` rule), then for every token in ``tokens`` and every window centre l,
    restore the clean ``kind`` state at that token in layers ``window_layers(l)``.
    ``target=None`` traces the model's own top prediction. ``engine``: "fast" (the
    partial forward, any backend), "generic" (whole passes with masks) or "auto" (fast);
    ``batch_tokens`` caps rows x positions per forward pass (default: from a memory
    budget); ``shapes``: "exact" or "bucketed" passes (default: bucketed on CUDA).
    ``occurrence``: which appearance of a repeated subject to noise (0 = first, -1 = last;
    None: the first, with a warning).
    """
    checked = _check_trace(model, prompt, subject, target, kind, window, samples, noise, tokens, seed, noise_draws,
                           engine, occurrence=occurrence)
    return _one(model, checked, batch_tokens, shapes)


def zero_trace(model, prompt: str, subject: str, target: str | None = None, kind: str = "mlp", window: int = 10,
               tokens="subject", batch_tokens: int | None = None, engine: str = "auto",
               shapes: str | None = None, occurrence: int | None = None) -> ZeroResult:
    """Representation zeroing: on the clean run, zero ``kind`` at the subject tokens (or
    ``tokens``) in the window around each layer; effect = fraction of p_clean removed.
    ``occurrence``: as for ``trace``."""
    checked = _check_zero(model, prompt, subject, target, kind, window, tokens, engine, occurrence=occurrence)
    return _one(model, checked, batch_tokens, shapes)


def default_prompt_batch(model, samples: int = 10, length: int = 32) -> int:
    """Prompts traced together by ``trace_many``: 1 where passes keep exact shapes (a CPU: packing
    would only add padding), else as many as a quarter of free GPU memory holds (base runs
    of ``length`` tokens: every block's input and keys/values, and the clean states), up to 64."""
    if model.device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(model.device)
    size = next(model.hf.parameters()).element_size()
    per_prompt = (samples + 1) * 3 * model.d_model * length * model.n_layers * size
    return int(max(1, min(64, free // 4 // per_prompt)))


def trace_many(model, records: Iterable, *, zeroing: bool = False, progress: bool = True, errors: str = "raise",
               batch: int | None = None, seeds: Sequence[int] | None = None, **kwargs) -> Iterator[tuple[object, TraceResult | ZeroResult | TracekitError]]:
    """Trace (or zero, ``zeroing=True``) each record, yielding (record, result) in order.

    A record is a dict with prompt/subject[/target], a (prompt, subject[, target])
    tuple, a known_1000 record or a CounterFact record (traces target_true).
    ``errors="yield"`` yields (record, TracekitError) for a bad record instead of raising.
    ``batch``: prompts traced together, their rows packed into shared passes by the fast
    engine (default ``default_prompt_batch``: 1 on a CPU); results come a batch at a time.
    ``seeds``: one noise seed per record (a study seeds each point by its case id) instead of ``seed``.
    Other keyword arguments go to ``trace`` / ``zero_trace``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if errors not in ("raise", "yield"):
        raise TracekitError(f"errors must be 'raise' or 'yield', got {errors!r}")
    records = list(records)
    check(seeds is None or len(seeds) == len(records), f"{0 if seeds is None else len(seeds)} seeds for "
                                                       f"{len(records)} records")
    if zeroing:  # the noise settings of a tracing sweep mean nothing to zeroing
        kwargs = {k: v for k, v in kwargs.items() if k not in ("samples", "noise", "seed", "noise_draws")}
        seeds = None
    batch_tokens = kwargs.pop("batch_tokens", None)
    check(batch is None or (isinstance(batch, int) and batch >= 1), f"batch must be an integer >= 1, got {batch!r}")
    batch = batch or default_prompt_batch(model, kwargs.get("samples", 10))
    check_record = _check_zero if zeroing else _check_trace
    shapes = kwargs.get("shapes")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("zeroing" if zeroing else "tracing", total=len(records))
        for first in range(0, len(records), batch):
            chunk, failure = [], None
            for at, record in enumerate(records[first:first + batch], start=first):
                own = kwargs if seeds is None else {**kwargs, "seed": seeds[at]}
                try:
                    chunk.append((record, check_record(model, *record_fields(record), **own)))
                except TracekitError as err:
                    if errors == "raise":
                        failure = err
                        break
                    chunk.append((record, err))
            checked = [item for _, item in chunk if isinstance(item, _Checked)]
            prepared = iter(_prepare(model, checked, shapes) if checked else [])
            chunk = [(record, item if isinstance(item, TracekitError) else next(prepared)) for record, item in chunk]
            if errors == "raise":  # some checks need the clean run: yield what came before, then raise
                bad = next((i for i, (_, item) in enumerate(chunk) if isinstance(item, TracekitError)), None)
                if bad is not None:
                    failure, chunk = chunk[bad][1], chunk[:bad]
            ready = [item for _, item in chunk if isinstance(item, _Prepared)]
            outputs = iter(_run(model, [p.job for p in ready], ready[0].engine, batch_tokens, shapes) if ready else [])
            for record, item in chunk:
                result = item if isinstance(item, TracekitError) else _finish(model, item, *next(outputs))
                bar.advance(task)
                yield record, result
            if failure is not None:
                raise failure


@dataclass(frozen=True)
class NoisedPrediction:
    token_id: int
    token: str
    p: float  # its probability averaged over the noise samples


def noised_prediction(model, prompt: str, subject: str, noise="s3", samples: int = 10, seed: int = 0,
                      noise_draws=None, occurrence: int | None = None) -> NoisedPrediction:
    """o_noise: the top next token of the corrupted run (probabilities averaged over samples),
    with the same noise ``trace`` uses for these arguments (Tracing Reversal's target)."""
    if noise_draws is not None:
        noise_draws = torch.as_tensor(noise_draws)
        samples = int(noise_draws.shape[0]) if noise_draws.ndim == 3 else samples
    start, end = model.subject_span(prompt, subject, occurrence)
    draws = scaled_noise(model, samples, end - start, noise, seed, draws=noise_draws)
    batch = model.encode([prompt])
    ids = batch.input_ids.expand(samples, -1)
    edits = {Site("embed"): subject_noise_hook(draws, start)}
    logits = model.run(ids, edits=edits, positions=batch.last.expand(samples)).logits
    probs = torch.softmax(logits.float(), dim=-1).mean(0)
    token_id = int(probs.argmax())
    return NoisedPrediction(token_id, model.tokenizer.decode([token_id]), float(probs[token_id]))
