"""Public entry points: ``trace``, ``zero_trace``, ``trace_many``, ``noised_prediction``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from tracekit.adapters import Site
from tracekit.errors import TracekitError
from tracekit.tracing import engine as E
from tracekit.tracing.noise import noise_scale, scaled_noise, subject_noise_hook
from tracekit.tracing.plan import Settings, record_fields, prepare_prompt, window_layers
from tracekit.tracing.result import TraceResult, ZeroResult


def _engine(model, requested: str) -> str:
    reason = E.fast_unsupported_reason(model)
    if requested == "fast" and reason is not None:
        raise TracekitError(f"engine='fast' cannot run this model: {reason}; use engine='generic' or 'auto'")
    if requested == "auto":
        return "fast" if reason is None else "generic"
    return requested


def _run(model, job: E.Job, engine: str, batch_tokens: int | None):
    with torch.no_grad():
        if engine == "fast":
            return E.run_fast(model, job, batch_tokens)
        return E.run_generic(model, job, batch_tokens)


def _clean(model, prompt, kind: str) -> tuple[float, list[torch.Tensor]]:
    """p_clean and the clean value of the traced site at every layer [1, T, d]."""
    sites = [Site(kind, layer) for layer in range(model.n_layers)]
    last = torch.tensor([prompt.length - 1])
    out = model.run(prompt.input_ids, capture=sites, positions=last)
    p_clean = float(torch.softmax(out.logits.float(), -1)[0, prompt.answer_id])
    return p_clean, [out.captured[s].detach() for s in sites]


def _trace_rows(positions: list[int], n_layers: int, window: int, samples: int, length: int) -> E.Rows:
    cells = [(t, window_layers(layer, window, n_layers)) for t in positions for layer in range(n_layers)]
    edit_pos = torch.zeros(len(cells), length, dtype=torch.bool)
    edit_pos[torch.arange(len(cells)), torch.tensor([t for t, _ in cells])] = True
    lo = torch.tensor([w.start for _, w in cells])
    hi = torch.tensor([w.stop for _, w in cells])
    each = lambda x: x.repeat_interleave(samples, dim=0)  # noqa: E731 - rows are (cell, sample)
    return E.Rows(torch.arange(samples).repeat(len(cells)), each(lo), each(hi), each(edit_pos))


def trace(model, prompt: str, subject: str, target: str | None = None, kind: str = "mlp", window: int = 10,
          samples: int = 10, noise="s3", tokens="all", seed: int = 0, noise_draws=None,
          batch_tokens: int | None = None, engine: str = "auto", occurrence: int | None = None) -> TraceResult:
    """Causal tracing of one prompt (method-notes "Causal tracing").

    Noise the subject's token embeddings (``samples`` seeded draws, the same for every
    restoration, or ``noise_draws`` [samples, subject tokens, d_model], scaled by the
    ``noise`` rule), then for every token in ``tokens`` and every window centre l,
    restore the clean ``kind`` state at that token in layers ``window_layers(l)``.
    ``target=None`` traces the model's own top prediction. ``engine``: "fast" (hf
    backend), "generic" (any backend) or "auto"; ``batch_tokens`` caps rows x positions
    per forward pass (default: from a memory budget). ``occurrence``: which appearance of a
    repeated subject to noise (0 = first, -1 = last; None: the first, with a warning).
    """
    if noise_draws is not None:
        noise_draws = torch.as_tensor(noise_draws)
        samples = int(noise_draws.shape[0]) if noise_draws.ndim == 3 else samples
    settings = Settings.make(model.n_layers, kind=kind, window=window, samples=samples, noise=noise, seed=seed,
                             tokens=tokens, engine=engine)
    p = prepare_prompt(model, prompt, subject, target, occurrence)
    start, end = p.span
    draws = scaled_noise(model, samples, end - start, noise, seed, draws=noise_draws)
    positions = p.positions(settings.tokens)
    chosen = _engine(model, settings.engine)
    p_clean, clean = _clean(model, p, kind)
    rows = _trace_rows(positions, model.n_layers, window, samples, p.length)
    job = E.Job(p.input_ids, p.answer_id, kind, rows, clean, draws, start)
    p_rows, p_base = _run(model, job, chosen, batch_tokens)
    p_restore = p_rows.view(len(positions), model.n_layers, samples).mean(-1)
    result = TraceResult.build(model, p, settings, positions, p_clean, float(p_base.mean()), p_restore,
                               engine=chosen, noise_scale=noise_scale(model, noise), target=target)
    result.config["noise_draws"] = "seeded" if noise_draws is None else "given"
    return result


def zero_trace(model, prompt: str, subject: str, target: str | None = None, kind: str = "mlp", window: int = 10,
               tokens="subject", batch_tokens: int | None = None, engine: str = "auto",
               occurrence: int | None = None) -> ZeroResult:
    """Representation zeroing: on the clean run, zero ``kind`` at the subject tokens (or
    ``tokens``) in the window around each layer; effect = fraction of p_clean removed."""
    settings = Settings.make(model.n_layers, kind=kind, window=window, tokens=tokens, engine=engine, zeroing=True)
    p = prepare_prompt(model, prompt, subject, target, occurrence)
    positions = p.positions(settings.tokens)
    chosen = _engine(model, settings.engine)
    p_clean, _ = _clean(model, p, kind)
    L = model.n_layers
    windows = [window_layers(layer, window, L) for layer in range(L)]
    edit_pos = torch.zeros(L, p.length, dtype=torch.bool)
    edit_pos[:, positions] = True
    rows = E.Rows(torch.zeros(L, dtype=torch.long), torch.tensor([w.start for w in windows]),
                  torch.tensor([w.stop for w in windows]), edit_pos)
    p_zero, _ = _run(model, E.Job(p.input_ids, p.answer_id, kind, rows, None, None), chosen, batch_tokens)
    config = {**settings.as_dict(), "engine": chosen, "backend": model.backend.name, "n_layers": L}
    for unused in ("samples", "noise", "seed"):
        config.pop(unused)
    return ZeroResult(model=model.spec, prompt=p.text, subject=p.subject, tokens=list(p.tokens),
                      subject_span=tuple(p.span), answer=p.answer, answer_id=p.answer_id, target=target,
                      p_clean=p_clean, config=config, positions=positions, p_zero=p_zero)


def trace_many(model, records: Iterable, *, zeroing: bool = False, progress: bool = True,
               errors: str = "raise", **kwargs) -> Iterator[tuple[object, TraceResult | ZeroResult | TracekitError]]:
    """Trace (or zero, ``zeroing=True``) each record, yielding (record, result) as each finishes.

    A record is a dict with prompt/subject[/target], a (prompt, subject[, target])
    tuple, a known_1000 record or a CounterFact record (traces target_true).
    ``errors="yield"`` yields (record, TracekitError) for a bad record instead of raising.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if errors not in ("raise", "yield"):
        raise TracekitError(f"errors must be 'raise' or 'yield', got {errors!r}")
    records = list(records)
    run = zero_trace if zeroing else trace
    if zeroing:  # the noise settings of a tracing sweep mean nothing to zeroing
        kwargs = {k: v for k, v in kwargs.items() if k not in ("samples", "noise", "seed", "noise_draws")}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("zeroing" if zeroing else "tracing", total=len(records))
        for record in records:
            try:
                prompt, subject, target = record_fields(record)
                result = run(model, prompt, subject, target, **kwargs)
            except TracekitError as err:
                if errors == "raise":
                    raise
                result = err
            bar.advance(task)
            yield record, result


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
