"""MEMIT for one fact (Meng et al. 2022b), as the public code, over a window of layers (Hase et al. 2023).

The target z is found at the LAST layer of the window: z = h_0 + delta, h_0 the block output at
the bare prompt's last subject token and the delta from ``kv_core.optimize_value`` (its clamp
sized on h_0). Then, layer by layer from the lowest, with the updates so far in place: the key
k at this layer (the mean over context types of each type's mean key: the bare prompt and the
sampled templates weigh one half each) and the bare prompt's current block output h at the last
layer; this layer takes its share r = (z - h) / (layers left) through
dW = r ((lambda C + k k^T)^-1 k)^T (``kv_core.solve_update`` with lambda = mom2_update_weight).

One layer, lambda = 0, ``clamp_to="mlp"``, uniform keys and the ``"mean"`` conventions give
exactly ROME's equation form (``update_key="mean"``): the test suite holds the two to the same update.
"""

from __future__ import annotations

import torch

from tracekit.adapters import Site
from tracekit.editing.context import context_templates
from tracekit.editing.delta import Edit
from tracekit.editing.hparams import MEMITHyperParams
from tracekit.editing.info import EditInfo
from tracekit.editing.kv_core import (NoisePasses, ValueObjective, average_keys, build_rows, optimize_value, param_name,
                                      solve_update, subject_states)
from tracekit.editing.presets import memit_preset
from tracekit.editing.request import EditRequest
from tracekit.editing.rome import Laps, conventions, key_statistics, resolve_layer
from tracekit.editing.windows import edit_window
from tracekit.errors import check


def memit_layers(model, layer: int, window: int, clip: bool = False) -> list[int]:
    """``window`` consecutive layers centred on ``layer`` (the tracing window's formula)."""
    return edit_window(model, layer, window, clip, "MEMIT")


def grouped_templates(model, hparams) -> list[list[str]]:
    """The context templates by type, as MEMIT averages its keys: [["{}"], [length-1 samples], ...]."""
    flat = context_templates(model, hparams.context_lengths, hparams.context_seed)
    groups, at = [flat[:1]], 1
    for _, count in hparams.context_lengths:
        if count:
            groups.append(flat[at:at + count])
            at += count
    return groups


def apply_memit(model, request: EditRequest, layer: int | None = None, hparams: MEMITHyperParams | None = None,
                *, engine: str = "auto", templates=None, progress: bool = True, second_moment=None) -> Edit:
    """Compute (not apply) MEMIT's edit of ``request`` over the window centred on ``layer``.

    ``templates``: a flat list (the bare "{}" first, then one context type) or a list of groups;
    ``second_moment``: C itself per layer instead of statistics from a corpus."""
    hparams = memit_preset(model) if hparams is None else hparams
    check(isinstance(hparams, MEMITHyperParams), f"MEMIT needs MEMITHyperParams, got {type(hparams).__name__}")
    layer = resolve_layer(model, layer, hparams)
    layers = memit_layers(model, layer, hparams.window, hparams.clip_window)
    last = layers[-1]
    adapter = model.adapter
    lap = Laps()
    if templates is None:
        templates = grouped_templates(model, hparams)
    C, stats_info = key_statistics(model, layers, hparams, second_moment, progress)
    lap("templates_and_stats")
    rows = build_rows(model, request, templates, hparams.kl_prompt)
    noise = NoisePasses(rows, model.d_model)
    objective = ValueObjective(model, rows, last, engine, noise=noise)
    found = optimize_value(objective, hparams, request.minimize, reference_site=hparams.clamp_to)
    resid = objective.initial.resid
    target = (resid[0] if hparams.value_reference == "first-row" else resid.mean(0)) + found.delta
    lap("v_star")

    weights = {x: adapter.down_proj_weight(model.hf, x) for x in layers}
    originals = {x: w.detach().clone() for x, w in weights.items()}
    new, shares = {}, []
    top = Site("resid", last)
    try:
        for i, x in enumerate(layers):
            key_site = Site("mlp_in", x)
            if hparams.z_current == "prompt":  # the public code: a pass for the keys, one for the bare prompt
                keys = subject_states(model, rows, [key_site], noise=noise)[key_site]
                current = subject_states(model, rows, [top], row_index=[0], noise=noise)[top][0]
            else:
                states = subject_states(model, rows, [key_site, top], noise=noise)
                keys, current = states[key_site], states[top].mean(0)
            key = average_keys(keys, rows.groups, hparams.key_average)
            share = (target - current) / (len(layers) - i)
            update = solve_update(C[x], key[:, None], share[:, None], hparams.mom2_update_weight, hparams.mom2_ridge)
            with torch.no_grad():
                weights[x].copy_(adapter.from_out_in(adapter.as_out_in(originals[x]).float() + update.to(weights[x].device)))
            new[x] = weights[x].detach().clone()
            shares.append({"layer": x, "residual_norm": float((target - current).norm()),
                           "share_norm": float(share.norm()), "update_norm": float(update.norm())})
    finally:
        with torch.no_grad():
            for x, w in weights.items():
                w.copy_(originals[x])
    lap("spread")
    info = EditInfo(
        method="memit", layers=layers, seconds=lap.done(), steps_taken=found.steps,
        losses=[t["loss"] for t in found.trace], final_nll=found.final_nll, engine=objective.engine,
        conventions=conventions(hparams, ("value_reference", "key_average", "z_current", "v_stop_on", "v_final_step",
                                          "erasure_objective", "erasure_final_step", "clamp_to")),
        noise=None if rows.noise is None else rows.noise.as_dict(),
        details={"z_layer": last, "templates": len(rows.spans) - 1, "loss_trace": found.trace,
                 "delta_norm": float(found.delta.norm()), "reference_norm": found.reference_norm, "z": target,
                 "delta": found.delta, "per_layer": shares, "stats": stats_info})
    return Edit(model.hf, {param_name(model, w): new[x] for x, w in weights.items()}, info)
