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

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from tracekit.adapters import Site
from tracekit.editing.context import context_templates
from tracekit.editing.delta import Edit
from tracekit.editing.hparams import MEMITHyperParams
from tracekit.editing.info import EditInfo
from tracekit.editing.kv_batch import FoundValue, shared_values
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
    return memit_edits(model, [request], layer, hparams, engine=engine, templates=templates, progress=progress,
                       second_moment=second_moment, batch=1)[0]


def memit_edits(model, requests: Sequence[EditRequest], layer: int | None = None,
                hparams: MEMITHyperParams | None = None, *, engine: str = "auto", templates=None,
                progress: bool = True, second_moment=None, batch: int | None = None) -> list[Edit]:
    """MEMIT's edit of each request on its own (none applied; each computed on the current
    weights): ``apply_memit`` one by one, with the v* of ``batch`` requests optimised together."""
    plan = _plan(model, requests, layer, hparams, engine, templates, progress, second_moment, batch)
    return [_spread(model, plan, [i]) for i in range(len(plan.requests))]


def apply_memit_mass(model, requests: Sequence[EditRequest], layer: int | None = None,
                     hparams: MEMITHyperParams | None = None, *, engine: str = "auto", templates=None,
                     progress: bool = True, second_moment=None, batch: int | None = None) -> Edit:
    """Mass editing (MEMIT's own use): one edit holding every request. Each request's z is found
    as for one fact (v* batched); then, layer by layer, the keys of ALL requests enter one update
    dW = R ((lam C + K K^T)^-1 K)^T, K [d_in, n] and R [d_model, n] the requests' keys and shares."""
    plan = _plan(model, requests, layer, hparams, engine, templates, progress, second_moment, batch)
    return _spread(model, plan, list(range(len(plan.requests))))


@dataclass
class _Plan:
    """What MEMIT's spread needs: per request its rows, noise, v* and target z at the top layer."""

    hparams: MEMITHyperParams
    requests: list[EditRequest]
    layers: list[int]
    C: dict
    stats_info: dict
    rows: list
    noises: list
    found: list[FoundValue]
    targets: list[torch.Tensor]
    seconds: dict


def _plan(model, requests, layer, hparams, engine, templates, progress, second_moment, batch) -> _Plan:
    hparams = memit_preset(model) if hparams is None else hparams
    check(isinstance(hparams, MEMITHyperParams), f"MEMIT needs MEMITHyperParams, got {type(hparams).__name__}")
    requests = list(requests)
    check(len(requests) > 0 and all(isinstance(r, EditRequest) for r in requests), "give a list of EditRequests")
    layer = resolve_layer(model, layer, hparams)
    layers = memit_layers(model, layer, hparams.window, hparams.clip_window)
    last = layers[-1]
    lap = Laps()
    if templates is None:
        templates = grouped_templates(model, hparams)
    C, stats_info = key_statistics(model, layers, hparams, second_moment, progress)
    lap("templates_and_stats")
    rows = [build_rows(model, r, templates, hparams.kl_prompt) for r in requests]
    noises = [NoisePasses(r, model.d_model) for r in rows]
    found = shared_values(model, rows, last, hparams, [r.minimize for r in requests], hparams.clamp_to, noises,
                          engine=engine, batch=batch)
    for i, request in enumerate(requests):
        if i not in found:
            started = time.perf_counter()
            objective = ValueObjective(model, rows[i], last, engine, noise=noises[i])
            result = optimize_value(objective, hparams, request.minimize, reference_site=hparams.clamp_to)
            found[i] = FoundValue(result, objective.initial, objective.engine, 1, time.perf_counter() - started)
    found_list = [found[i] for i in range(len(requests))]
    targets = []
    for f in found_list:
        resid = f.initial.resid
        targets.append((resid[0] if hparams.value_reference == "first-row" else resid.mean(0)) + f.result.delta)
    return _Plan(hparams, requests, layers, C, stats_info, rows, noises, found_list, targets, dict(lap.seconds))


def _spread(model, plan: _Plan, which: list[int]) -> Edit:
    """Spread requests ``which``'s residuals over the window, lowest layer first, the updates so far
    in place (restored before returning): one update per layer for all of them."""
    hparams, layers, adapter = plan.hparams, plan.layers, model.adapter
    started = time.perf_counter()
    weights = {x: adapter.down_proj_weight(model.hf, x) for x in layers}
    originals = {x: w.detach().clone() for x, w in weights.items()}
    new, shares = {}, []
    top = Site("resid", layers[-1])
    try:
        for i, x in enumerate(layers):
            key_site = Site("mlp_in", x)
            keys, residuals = [], []
            for r in which:
                rows, noise = plan.rows[r], plan.noises[r]
                if hparams.z_current == "prompt":  # the public code: a pass for the keys, one for the bare prompt
                    states = subject_states(model, rows, [key_site], noise=noise)[key_site]
                    current = subject_states(model, rows, [top], row_index=[0], noise=noise)[top][0]
                else:
                    both = subject_states(model, rows, [key_site, top], noise=noise)
                    states, current = both[key_site], both[top].mean(0)
                keys.append(average_keys(states, rows.groups, hparams.key_average))
                residuals.append(plan.targets[r] - current)
            K, R = torch.stack(keys, dim=1), torch.stack(residuals, dim=1)
            share = R / (len(layers) - i)
            update = solve_update(plan.C[x], K, share, hparams.mom2_update_weight, hparams.mom2_ridge)
            with torch.no_grad():
                weights[x].copy_(adapter.from_out_in(adapter.as_out_in(originals[x]).float() + update.to(weights[x].device)))
            new[x] = weights[x].detach().clone()
            shares.append({"layer": x, "residual_norm": float(R.norm()), "share_norm": float(share.norm()),
                           "update_norm": float(update.norm())})
    finally:
        with torch.no_grad():
            for x, w in weights.items():
                w.copy_(originals[x])
    seconds = {**plan.seconds, "v_star": sum(plan.found[r].seconds for r in which),
               "spread": time.perf_counter() - started}
    seconds["total"] = sum(seconds.values())
    first = plan.found[which[0]]
    value = first.result
    info = EditInfo(
        method="memit", layers=layers, seconds=seconds, steps_taken=value.steps,
        losses=[t["loss"] for t in value.trace], final_nll=value.final_nll, engine=first.engine,
        conventions=conventions(hparams, ("value_reference", "key_average", "z_current", "v_stop_on", "v_final_step",
                                          "erasure_objective", "erasure_final_step", "clamp_to")),
        noise=None if plan.rows[which[0]].noise is None else plan.rows[which[0]].noise.as_dict(),
        details={"z_layer": layers[-1], "templates": len(plan.rows[which[0]].spans) - 1, "loss_trace": value.trace,
                 "delta_norm": float(value.delta.norm()), "reference_norm": value.reference_norm,
                 "z": plan.targets[which[0]], "delta": value.delta, "per_layer": shares, "stats": plan.stats_info,
                 "batch": first.batch, "requests": len(which)})
    if len(which) > 1:  # mass editing: every request's own v* record
        info.details["values"] = [{"steps": plan.found[r].result.steps, "final_nll": plan.found[r].result.final_nll,
                                   "delta_norm": float(plan.found[r].result.delta.norm())} for r in which]
    return Edit(model.hf, {param_name(model, w): new[x] for x, w in weights.items()}, info, model=model)
