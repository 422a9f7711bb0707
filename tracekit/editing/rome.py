"""ROME: a rank-one update of one MLP down-projection (Meng et al. 2022a), as the public code.

k* is the key averaged over the context templates, C = E[k k^T] over a corpus, and
v* = v_0 + delta with v_0 the MLP output at the bare prompt's last subject token and the delta
from ``kv_core.optimize_value``. The update, in the adapter's (out, in) orientation (GPT-2's
Conv1D stores W transposed), is the public code's

    W' = W + (v* - W k_p - b) (C^-1 k*)^T / ((C^-1 k*)^T k_p),

k_p being the bare prompt's own key: the edited prompt receives exactly v*. The paper's
equation (``update_key="mean"``) divides by (C^-1 k*)^T k* and subtracts W k* + b, so that
W' k* = v*; the edited prompt then receives v* only in proportion to how close k_p is to k*.

With ``key_per_tokenisation`` (tracekit's extension, off in every preset) the templates' keys
are averaged per distinct subject tokenisation instead, and the same solve makes W' k_g = v*
for each group (a rank-g update); v*'s objective then weighs the groups equally.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from tracekit.adapters import Site
from tracekit.editing.context import context_templates
from tracekit.editing.covariance import second_moments
from tracekit.editing.delta import Edit
from tracekit.editing.factors import LayerStats, matrix_identity, ridged
from tracekit.editing.hparams import ROMEHyperParams
from tracekit.editing.info import EditInfo
from tracekit.editing.kv_batch import FoundValue, shared_values
from tracekit.editing.kv_core import (NoisePasses, ValueObjective, build_rows, keys_by_tokenisation, optimize_value,
                                      param_name, solve_update, subject_states, weights_by_tokenisation)
from tracekit.editing.presets import rome_preset
from tracekit.editing.request import EditRequest
from tracekit.errors import check


def resolve_layer(model, layer, hparams) -> int:
    layer = hparams.layer if layer is None else layer
    check(layer is not None, "give a layer (this preset has no default layer)")
    check(isinstance(layer, int) and not isinstance(layer, bool), f"layer must be an integer, got {layer!r}")
    return model.adapter.check_layer(model.hf, layer)


class Laps:
    """Seconds per phase of an edit."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = self.clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.clock
        self.clock = now

    def done(self) -> dict[str, float]:
        self.seconds["total"] = time.perf_counter() - self.started
        return self.seconds


def key_statistics(model, layers, hparams, second_moment=None, progress=True) -> tuple[dict, dict]:
    """C per layer as ``factors.LayerStats`` ({layer: stats}, factorisations memoised per model)
    and a record of where it came from.

    ``second_moment``: C given directly ({layer: tensor}, or one tensor for one layer)."""
    if second_moment is not None:
        given = second_moment if isinstance(second_moment, dict) else {layers[0]: second_moment}
        check(all(layer in given for layer in layers), f"second_moment gives C for layers {sorted(given)}, need {layers}")
        return ({layer: LayerStats(model, layer, given[layer], matrix_identity(given[layer])) for layer in layers},
                {layer: {"path": "given"} for layer in layers})
    stats = second_moments(model, layers, n_samples=hparams.mom2_n_samples, sample_tokens=hparams.mom2_sample_tokens,
                           dtype=hparams.mom2_dtype, corpus=hparams.corpus,
                           stats_file=getattr(hparams, "stats_file", None), progress=progress)
    return ({layer: LayerStats(model, layer, s.matrix, s.metadata.get("sha256") or matrix_identity(s.matrix))
             for layer, s in stats.items()},
            {layer: {"path": str(s.path), "tokens": s.tokens} for layer, s in stats.items()})


def rank_one(C, key: torch.Tensor, residual: torch.Tensor, denominator_key: torch.Tensor,
             hparams) -> torch.Tensor:
    """residual (C^-1 k*)^T / ((C^-1 k*)^T d), [d_out, d_in]; d = ``denominator_key``.

    ``C``: a ``factors.LayerStats`` (its factor or inverse made once per layer) or a matrix."""
    if hparams.mom2_solve == "float64":
        return solve_update(C, key[:, None], residual[:, None], 0.0, hparams.mom2_ridge,
                            denominator_keys=denominator_key[:, None])
    if isinstance(C, LayerStats):
        inverse = C.inverse(hparams.mom2_dtype, hparams.mom2_ridge)
    else:
        inverse = torch.inverse(ridged(C, hparams.mom2_ridge, getattr(torch, hparams.mom2_dtype))).float()
    u = inverse @ key.float().to(inverse.device)  # the public code's compute_u ...
    u = u / u.norm()
    right = residual.float().to(u.device) / torch.dot(denominator_key.float().to(u.device), u)  # ... and compute_v
    return right[:, None] @ u[None]


def conventions(hparams, names) -> dict:
    return {name: getattr(hparams, name) for name in names}


def apply_rome(model, request: EditRequest, layer: int | None = None, hparams: ROMEHyperParams | None = None,
               *, engine: str = "auto", templates=None, progress: bool = True, second_moment=None) -> Edit:
    """Compute (not apply) ROME's edit of ``request`` at ``layer``; ``.apply()`` or ``with`` it.

    ``templates``: the context templates (default: sampled from the model, cached);
    ``second_moment``: C itself instead of statistics from a corpus (tests, golden runs)."""
    return rome_edits(model, [request], layer, hparams, engine=engine, templates=templates, progress=progress,
                      second_moment=second_moment, batch=1)[0]


def rome_edits(model, requests: Sequence[EditRequest], layer: int | None = None, hparams: ROMEHyperParams | None = None,
               *, engine: str = "auto", templates=None, progress: bool = True, second_moment=None,
               batch: int | None = None) -> list[Edit]:
    """ROME's edit of each request at ``layer``, each computed on the current weights on its own
    (none applied): the same edits as ``apply_rome`` one by one, with the v* of ``batch`` requests
    optimised together in one pass per step (``kv_batch``; whole passes under subject noise drawn
    afresh per pass) and the key statistics' factor shared. ``engine="hooks"`` runs one by one."""
    hparams = rome_preset(model) if hparams is None else hparams
    check(isinstance(hparams, ROMEHyperParams), f"ROME needs ROMEHyperParams, got {type(hparams).__name__}")
    requests = list(requests)
    check(len(requests) > 0 and all(isinstance(r, EditRequest) for r in requests), "give a list of EditRequests")
    layer = resolve_layer(model, layer, hparams)
    lap = Laps()
    if templates is None:
        templates = context_templates(model, hparams.context_lengths, hparams.context_seed)
    lap("templates")
    C, stats_info = key_statistics(model, [layer], hparams, second_moment, progress)
    lap("stats")
    shared = dict(lap.seconds)
    rows = [build_rows(model, r, templates, hparams.kl_prompt) for r in requests]
    noises = [NoisePasses(r, model.d_model) for r in rows]
    # With one key per tokenisation, each tokenisation gets an equal share of v*'s objective too:
    # ROME's templates hold the bare prompt once and the subject after a space twenty times.
    weights = [weights_by_tokenisation(r) if hparams.key_per_tokenisation else None for r in rows]
    # Noise drawn afresh per pass: keep the public code's order of passes in each request's stream
    # (compute_u's pass over the templates, then compute_v's passes, then one over the bare prompt).
    key_in = Site("mlp_in", layer)
    template_keys = {i: subject_states(model, rows[i], [key_in], noise=noises[i])[key_in]
                     for i in range(len(requests)) if noises[i].fresh}
    found = shared_values(model, rows, layer, hparams, [r.minimize for r in requests], "mlp", noises, engine=engine,
                          weights=weights, batch=batch)
    edits = []
    for i, request in enumerate(requests):
        if i not in found:
            started = time.perf_counter()
            objective = ValueObjective(model, rows[i], layer, engine, template_weights=weights[i], noise=noises[i])
            result = optimize_value(objective, hparams, request.minimize, reference_site="mlp")
            found[i] = FoundValue(result, objective.initial, objective.engine, 1, time.perf_counter() - started)
        edits.append(_rome_update(model, rows[i], noises[i], found[i], template_keys.get(i), C[layer], layer, hparams,
                                  {**shared, "v_star": found[i].seconds}, stats_info[layer]))
    return edits


def _rome_update(model, rows, noise, found: FoundValue, template_keys, C, layer: int, hparams, seconds: dict,
                 stats_info: dict) -> Edit:
    """The rank-one update that maps the request's key onto v* (module doc), as an Edit."""
    started = time.perf_counter()
    key_in, mlp_out = Site("mlp_in", layer), Site("mlp", layer)
    initial, value = found.initial, found.result
    template_keys = initial.keys if template_keys is None else template_keys
    key = template_keys.mean(0)
    v_star = value.reference + value.delta
    if hparams.key_per_tokenisation:  # W' k_g = v* for every tokenisation's key k_g
        keys, outputs = keys_by_tokenisation(rows, template_keys, initial.mlp_out)
        residuals = v_star[:, None] - outputs.T
        update = solve_update(C, keys.T, residuals, 0.0, hparams.mom2_ridge)
    elif hparams.update_key == "prompt":
        if noise.fresh:
            bare = subject_states(model, rows, [key_in, mlp_out], row_index=[0], noise=noise)
            k_p, out_p = bare[key_in][0], bare[mlp_out][0]
        else:
            k_p, out_p = initial.keys[0], initial.mlp_out[0]
        keys, residuals = k_p[None], (v_star - out_p)[:, None]  # W' k_p = v*
        update = rank_one(C, key, residuals[:, 0], k_p, hparams)
    else:  # the paper's equation: W' k* = v*
        keys, residuals = key[None], (v_star - initial.mlp_out.mean(0))[:, None]
        update = rank_one(C, key, residuals[:, 0], key, hparams)
    weight = model.adapter.down_proj_weight(model.hf, layer)
    adapter = model.adapter
    new = adapter.from_out_in(adapter.as_out_in(weight.detach()).float() + update.to(weight.device))
    seconds = {**seconds, "update": time.perf_counter() - started}
    seconds["total"] = sum(seconds.values())
    info = EditInfo(
        method="rome", layers=[layer], seconds=seconds, steps_taken=value.steps,
        losses=[t["loss"] for t in value.trace], final_nll=value.final_nll, engine=found.engine,
        conventions=conventions(hparams, ("value_reference", "update_key", "v_stop_on", "v_final_step",
                                          "erasure_objective", "erasure_final_step", "key_per_tokenisation", "mom2_solve")),
        noise=None if rows.noise is None else rows.noise.as_dict(),
        details={"templates": len(rows.spans) - 1, "loss_trace": value.trace, "delta_norm": float(value.delta.norm()),
                 "value_norm": value.reference_norm, "v_star_norm": float(v_star.norm()), "key_norm": float(key.norm()),
                 "update_norm": float(update.norm()), "stats": stats_info, "batch": found.batch,
                 "key": key, "delta": value.delta, "v_star": v_star,  # k*, v* - v_0, v*
                 "mean_output": initial.mlp_out.mean(0),  # W k* + b
                 "keys": keys, "residuals": residuals.T,  # keys the update maps onto v*, and v* - (W k + b) for each
                 "update": update})
    return Edit(model.hf, {param_name(model, weight): new}, info, model=model)
