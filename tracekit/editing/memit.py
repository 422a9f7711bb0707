"""MEMIT for one fact (Meng et al. 2022b), as in Hase et al. 2023: a window of layers.

The target z is found at the LAST layer of the window: z = h + delta, with h the block
output at the last subject token (mean over the context templates) and the delta from
``kv_core.optimize_value``. Then, layer by layer from the lowest: the key k at this layer
and the current h at the last layer are measured with the updates so far in place, and
this layer takes its share r = (z - h) / (layers left) through
dW = r ((lambda C + k k^T)^-1 k)^T (``kv_core.solve_update`` with lambda = mom2_update_weight).

One layer, lambda = 0 and ``clamp_to="mlp"`` give exactly ROME (same key, same delta,
same C): the test suite holds the two to the same update.
"""

from __future__ import annotations

import time

import torch

from tracekit.adapters import Site
from tracekit.editing.context import context_templates
from tracekit.editing.covariance import second_moments
from tracekit.editing.delta import Edit
from tracekit.editing.hparams import MEMITHyperParams, memit_preset
from tracekit.editing.kv_core import ValueObjective, build_rows, optimize_value, param_name, solve_update, subject_states
from tracekit.editing.request import EditRequest
from tracekit.editing.rome import resolve_layer
from tracekit.editing.windows import edit_window
from tracekit.errors import check


def memit_layers(model, layer: int, window: int, clip: bool = False) -> list[int]:
    """``window`` consecutive layers centred on ``layer`` (the tracing window's formula)."""
    return edit_window(model, layer, window, clip, "MEMIT")


def apply_memit(model, request: EditRequest, layer: int | None = None, hparams: MEMITHyperParams | None = None,
                *, engine: str = "auto", templates: list[str] | None = None, progress: bool = True) -> Edit:
    """Compute (not apply) MEMIT's edit of ``request`` over the window centred on ``layer``."""
    hparams = memit_preset(model) if hparams is None else hparams
    check(isinstance(hparams, MEMITHyperParams), f"MEMIT needs MEMITHyperParams, got {type(hparams).__name__}")
    layer = resolve_layer(model, layer, hparams)
    layers = memit_layers(model, layer, hparams.window, hparams.clip_window)
    last = layers[-1]
    adapter = model.adapter
    started = time.perf_counter()
    if templates is None:
        templates = context_templates(model, hparams.context_lengths, hparams.context_seed)
    stats = second_moments(model, layers, n_samples=hparams.mom2_n_samples, sample_tokens=hparams.mom2_sample_tokens,
                           dtype=hparams.mom2_dtype, corpus=hparams.corpus, progress=progress)
    seconds = {"templates_and_stats": time.perf_counter() - started}
    rows = build_rows(model, request, templates, hparams.kl_prompt if hparams.kl_factor > 0 else None)
    objective = ValueObjective(model, rows, last, engine)
    reference = objective.resid.mean(0) if hparams.clamp_to == "resid" else objective.mlp_out.mean(0)
    found = optimize_value(objective, reference, hparams, request.minimize)
    target = objective.resid.mean(0) + found.delta
    seconds["v_star"] = time.perf_counter() - started - seconds["templates_and_stats"]

    weights = {x: adapter.down_proj_weight(model.hf, x) for x in layers}
    originals = {x: w.detach().clone() for x, w in weights.items()}
    new, shares = {}, []
    try:
        for i, x in enumerate(layers):
            states = subject_states(model, rows, [Site("mlp_in", x), Site("resid", last)])
            key, current = states[Site("mlp_in", x)].mean(0), states[Site("resid", last)].mean(0)
            share = (target - current) / (len(layers) - i)
            update = solve_update(stats[x].matrix, key[:, None], share[:, None], hparams.mom2_update_weight,
                                  hparams.mom2_ridge)
            with torch.no_grad():
                weights[x].copy_(adapter.from_out_in(adapter.as_out_in(weights[x]).float() + update.to(weights[x].device)))
            new[x] = weights[x].detach().clone()
            shares.append({"layer": x, "residual_norm": float((target - current).norm()),
                           "share_norm": float(share.norm()), "update_norm": float(update.norm())})
    finally:
        with torch.no_grad():
            for x, w in weights.items():
                w.copy_(originals[x])
    seconds["spread"] = time.perf_counter() - started - sum(seconds.values())
    seconds["total"] = time.perf_counter() - started
    info = {
        "method": "memit", "layer": layer, "layers": layers, "z_layer": last, "engine": objective.engine,
        "templates": len(templates), "loss_trace": found.trace, "final_nll": found.final_nll,
        "steps_taken": len(found.trace), "delta_norm": float(found.delta.norm()), "reference_norm": found.reference_norm,
        "per_layer": shares, "stats": {x: {"path": str(s.path), "tokens": s.tokens} for x, s in stats.items()},
        "seconds": seconds,
    }
    return Edit(model.hf, {param_name(model, w): new[x] for x, w in weights.items()}, info)
