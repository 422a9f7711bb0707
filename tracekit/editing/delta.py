"""``Edit``: a set of new weights that can be applied and undone bit for bit.

Edits do not compose: each one is computed on particular weights and restores exactly those.
``apply`` therefore checks that the model still holds the weights the edit was computed on, and
``undo`` that it holds the edit's own weights; anything else (another edit applied on the same
parameters, an edit computed on top of one since undone) is a one-line ``TracekitError``, never
a silent mix of two edits. Edits on disjoint parameters can be applied together in any order.
To stack edits on purpose, apply the first and compute the second on the edited model; undo
them in reverse order.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from tracekit.errors import TracekitError, check


class Edit:
    """New values for some parameters of a model.

    The originals are cloned when the Edit is made, so ``undo`` restores them exactly
    (``torch.equal``). Usable as a context manager: ``with edit: ...`` applies it and undoes
    it on exit. ``apply`` and ``undo`` are idempotent and check the weights (module doc).
    """

    def __init__(self, module: nn.Module, new_weights: Mapping[str, torch.Tensor], info: Any = None):
        params = dict(module.named_parameters())
        for name, value in new_weights.items():
            check(name in params, f"the model has no parameter {name!r}")
            check(params[name].shape == value.shape, f"new value for {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise TracekitError(f"refusing an edit with non-finite (NaN or inf) values in {name}; check the key "
                                    "statistics and hyperparameters it was computed from")
        self._params = {name: params[name] for name in new_weights}
        self._new = {name: value.detach().to(params[name].dtype).clone() for name, value in new_weights.items()}
        self._old = {name: params[name].detach().clone() for name in new_weights}
        self.info = info  # an editing.info.EditInfo from tracekit's editors
        self.applied = False

    @property
    def parameter_names(self) -> list[str]:
        return list(self._params)

    def delta(self, name: str) -> torch.Tensor:
        """new - original, in the parameter's stored orientation."""
        return self._new[name] - self._old[name]

    def _not_holding(self, values: Mapping[str, torch.Tensor]) -> list[str]:
        return [name for name, param in self._params.items() if not torch.equal(param, values[name])]

    @torch.no_grad()
    def apply(self) -> "Edit":
        """Write the new weights; the model must hold the weights this edit was computed on."""
        if self.applied and not self._not_holding(self._new):
            return self
        changed = [name for name in self._not_holding(self._old) if not torch.equal(self._params[name], self._new[name])]
        if changed:
            raise TracekitError(
                f"cannot apply this edit: {changed[0]} no longer holds the weights it was computed on (another "
                "edit applied there?); undo that edit first, or compute this one on the current weights")
        for name, param in self._params.items():
            param.copy_(self._new[name])
        self.applied = True
        return self

    @torch.no_grad()
    def undo(self) -> "Edit":
        """Restore the original weights; a no-op if this edit is not applied."""
        if not self.applied:
            return self
        changed = self._not_holding(self._new)
        if changed:
            raise TracekitError(
                f"cannot undo this edit: {changed[0]} has changed since it was applied (a later edit applied on top?); "
                "undo the later edit first (edits undo in reverse order)")
        for name, param in self._params.items():
            param.copy_(self._old[name])
        self.applied = False
        return self

    def __enter__(self) -> "Edit":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"Edit({', '.join(self._params)}, applied={self.applied})"


# ---- several edits in one pass (scoring many points at once) -------------------------------------
def down_proj_deltas(model, edit: Edit) -> dict[int, torch.Tensor] | None:
    """{layer: W' - W in (out, in) orientation, float32} if ``edit`` changes only MLP
    down-projection weights (ROME, MEMIT, FT without biases), else None."""
    by_param = {id(model.adapter.down_proj_weight(model.hf, layer)): layer for layer in range(model.n_layers)}
    out = {}
    for name, param in edit._params.items():
        layer = by_param.get(id(param))
        if layer is None:
            return None
        out[layer] = model.adapter.as_out_in(edit._new[name].float() - edit._old[name].float())
    return out


def row_delta_edits(model, deltas: list[dict[int, torch.Tensor]], row_groups: torch.Tensor) -> dict:
    """Edits for one pass in which rows of group g see the weights W + deltas[g] at each edited
    down-projection: the MLP's input is kept (``Site("mlp_in", l)``) and x dW_g^T added to the
    output of group g's rows (``Site("mlp", l)``)."""
    from tracekit.adapters import Site

    layers = sorted({layer for d in deltas for layer in d})
    keys: dict[int, torch.Tensor] = {}
    edits = {}
    for layer in layers:
        groups = [(g, d[layer]) for g, d in enumerate(deltas) if layer in d]

        def keep(x, layer=layer):
            keys[layer] = x
            return x

        def add(h, layer=layer, groups=groups):
            x = keys.pop(layer)
            at = row_groups[: h.shape[0]].to(h.device)
            bump = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
            for g, dW in groups:
                rows = torch.nonzero(at == g).flatten()
                if len(rows):
                    bump[rows] = x[rows].float() @ dW.to(h.device).T
            return h + bump.to(h.dtype)

        edits[Site("mlp_in", layer)] = keep
        edits[Site("mlp", layer)] = add
    return edits
