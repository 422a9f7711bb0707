"""ROME: a rank-one update of one MLP down-projection (Meng et al. 2022a).

W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*), in the (out, in) orientation of the
adapter (GPT-2's Conv1D stores W transposed), where k* is the key averaged over the context
templates, C = E[k k^T] over a corpus, and v* = W k* + b + delta with the delta found by
``kv_core.optimize_value`` at the MLP output. As W k* + b is the templates' mean MLP output,
v* - (W k* + b) is the delta itself: W' k* = v* exactly.

With ``key_per_tokenisation`` (off in every preset), the templates' keys are averaged per
distinct subject tokenisation instead, and the same solve makes W' k_g = v* for each group
(a rank-g update); v*'s objective weighs the groups equally. A subject that opens a prompt
often tokenises differently from one after a space, and ROME's average key then fits mostly
the majority form (docs/replication/README.md).
"""

from __future__ import annotations

import time

import torch

from tracekit.editing.context import context_templates
from tracekit.editing.covariance import second_moments
from tracekit.editing.delta import Edit
from tracekit.editing.hparams import ROMEHyperParams, rome_preset
from tracekit.editing.kv_core import (ValueObjective, build_rows, keys_by_tokenisation, optimize_value, param_name,
                                      solve_update, weights_by_tokenisation)
from tracekit.editing.request import EditRequest
from tracekit.errors import check


def resolve_layer(model, layer, hparams) -> int:
    layer = hparams.layer if layer is None else layer
    check(layer is not None, "give a layer (this preset has no default layer)")
    check(isinstance(layer, int) and not isinstance(layer, bool), f"layer must be an integer, got {layer!r}")
    return model.adapter.check_layer(model.hf, layer)


def apply_rome(model, request: EditRequest, layer: int | None = None, hparams: ROMEHyperParams | None = None,
               *, engine: str = "auto", templates: list[str] | None = None, progress: bool = True) -> Edit:
    """Compute (not apply) ROME's edit of ``request`` at ``layer``; ``.apply()`` or ``with`` it."""
    hparams = rome_preset(model) if hparams is None else hparams
    check(isinstance(hparams, ROMEHyperParams), f"ROME needs ROMEHyperParams, got {type(hparams).__name__}")
    layer = resolve_layer(model, layer, hparams)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    if templates is None:
        templates = context_templates(model, hparams.context_lengths, hparams.context_seed)
    lap("templates")
    stats = second_moments(model, [layer], n_samples=hparams.mom2_n_samples, sample_tokens=hparams.mom2_sample_tokens,
                           dtype=hparams.mom2_dtype, corpus=hparams.corpus, stats_file=hparams.stats_file,
                           progress=progress)[layer]
    lap("stats")
    rows = build_rows(model, request, templates, hparams.kl_prompt if hparams.kl_factor > 0 else None)
    # With one key per tokenisation, each tokenisation gets an equal share of v*'s objective too:
    # ROME's templates hold the bare prompt once and the subject after a space twenty times.
    weights = weights_by_tokenisation(rows) if hparams.key_per_tokenisation else None
    objective = ValueObjective(model, rows, layer, engine, template_weights=weights)
    lap("prefix")
    key = objective.keys.mean(0)
    value = objective.mlp_out.mean(0)  # W k* + b
    found = optimize_value(objective, value, hparams, request.minimize)
    lap("v_star")
    if hparams.key_per_tokenisation:  # W' k_g = v* for every tokenisation's key k_g
        keys, outputs = keys_by_tokenisation(rows, objective.keys, objective.mlp_out)
        residuals = (value + found.delta)[:, None] - outputs.T  # v* - (W k_g + b)
    else:
        keys, residuals = key[None], found.delta[:, None]
    update = solve_update(stats.matrix, keys.T, residuals, 0.0, hparams.mom2_ridge)
    weight = model.adapter.down_proj_weight(model.hf, layer)
    adapter = model.adapter
    new = adapter.from_out_in(adapter.as_out_in(weight.detach()).float() + update.to(weight.device))
    lap("update")
    seconds["total"] = sum(seconds.values())
    info = {
        "method": "rome", "layer": layer, "layers": [layer], "engine": objective.engine,
        "templates": len(templates), "loss_trace": found.trace, "final_nll": found.final_nll,
        "steps_taken": len(found.trace), "delta_norm": float(found.delta.norm()), "value_norm": found.reference_norm,
        "v_star_norm": float((value + found.delta).norm()), "key_norm": float(key.norm()),
        "update_norm": float(update.norm()), "stats": {"path": str(stats.path), "tokens": stats.tokens},
        "key": key, "delta": found.delta,  # k* and v* - (W k* + b), for checks
        "keys": keys, "residuals": residuals.T,  # each key the update maps onto v*, and v* - (W k + b)
        "seconds": seconds,
    }
    return Edit(model.hf, {param_name(model, weight): new}, info)
