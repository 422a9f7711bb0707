"""The reference loop: one forward pass per (token, layer), as ROME's causal tracing does.

Each pass holds ``samples + 1`` rows: row 0 runs clean, rows 1.. carry the subject
noise, and a hook copies row 0's state at token t into rows 1.. at every layer of the
window. Logits are computed at every position (as a plain ``model(...)`` call does) and
the last one is read. Slow on purpose: tests and benchmarks compare the engines with it.
"""

from __future__ import annotations

import torch

from tracekit.adapters import Site
from tracekit.tracing.noise import noise_scale, scaled_noise, subject_noise_hook
from tracekit.tracing.plan import Settings, prepare_prompt, window_layers


def _copy_clean_row(t: int):
    """Rows 1.. take row 0's vector at position t."""
    def hook(hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.clone()
        out[1:, t] = hidden[0, t]
        return out

    return hook


def _probs(model, ids, edits, answer_id) -> torch.Tensor:
    logits = model.run(ids, edits=edits).logits[:, -1]
    return torch.softmax(logits.float(), dim=-1)[:, answer_id].cpu()


def naive_trace(model, prompt: str, subject: str, target: str | None = None, kind: str = "mlp", window: int = 10,
                samples: int = 10, noise="s3", tokens="all", seed: int = 0, noise_draws=None):
    """Same arguments and result as ``tracekit.tracing.trace``; T x L forward passes."""
    from tracekit.tracing.result import TraceResult

    if noise_draws is not None:
        samples = int(torch.as_tensor(noise_draws).shape[0])
    settings = Settings.make(model.n_layers, kind=kind, window=window, samples=samples, noise=noise, seed=seed,
                             tokens=tokens, engine="auto")
    p = prepare_prompt(model, prompt, subject, target)
    start, end = p.span
    draws = scaled_noise(model, samples, end - start, noise, seed, draws=noise_draws)
    noise_rows = torch.cat([torch.zeros_like(draws[:1]), draws])  # row 0 stays clean
    ids = p.input_ids.expand(samples + 1, -1)
    noised = {Site("embed"): subject_noise_hook(noise_rows, start)}
    base = _probs(model, ids, noised, p.answer_id)
    positions = p.positions(settings.tokens)
    p_restore = torch.zeros(len(positions), model.n_layers)
    for i, t in enumerate(positions):
        for layer in range(model.n_layers):
            edits = dict(noised)
            for j in window_layers(layer, window, model.n_layers):
                edits[Site(kind, j)] = _copy_clean_row(t)
            p_restore[i, layer] = _probs(model, ids, edits, p.answer_id)[1:].mean()
    return TraceResult.build(model, p, settings, positions, float(base[0]), float(base[1:].mean()), p_restore,
                             engine="naive", noise_scale=noise_scale(model, noise), target=target)
