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

import hashlib
import json
from pathlib import Path
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

    def __init__(self, module: nn.Module, new_weights: Mapping[str, torch.Tensor], info: Any = None,
                 model: Any = None):
        """``model``: the ``tracekit`` Model whose ``hf`` is ``module`` (``save`` records its fingerprint)."""
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
        self.model = model

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

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path, model: Any = None) -> Path:
        """Write the new weights to a safetensors file, with the fingerprint of the model they were
        computed on (``tracekit.identity``), each original parameter's sha256 and the edit's record."""
        from safetensors.torch import save_file

        from tracekit.identity import weight_fingerprint

        model = model if model is not None else self.model
        check(model is not None, "Edit.save needs the model it was computed on: edit.save(path, model=model)")
        check(model.hf is self._module_of(model), "this edit belongs to another model")
        was_applied = self.applied
        self.undo()  # the fingerprint is of the weights the edit was computed on
        try:
            fingerprint = weight_fingerprint(model)
        finally:
            if was_applied:
                self.apply()
        metadata = {"format": EDIT_FORMAT, "spec": str(model.spec), "fingerprint": fingerprint,
                    "originals": json.dumps({name: tensor_sha256(old) for name, old in self._old.items()}),
                    "info": json.dumps(_info_record(self.info), default=str)}
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: value.detach().cpu().contiguous() for name, value in self._new.items()}, str(path),
                  metadata=metadata)
        return path

    @classmethod
    def load(cls, path, model) -> "Edit":
        """An Edit read by ``save``, for ``model``: the model must be the one it was computed on
        (same fingerprint, and the edited parameters' original values); else a one-line error."""
        from safetensors import safe_open

        from tracekit.identity import weight_fingerprint

        path = Path(path).expanduser()
        check(path.is_file(), f"edit file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                new = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # a truncated or foreign file
            raise TracekitError(f"{path} is not a tracekit edit file ({type(err).__name__})") from None
        check(metadata.get("format") == EDIT_FORMAT, f"{path} is not a tracekit edit file (format "
                                                     f"{metadata.get('format')!r}, expected {EDIT_FORMAT!r})")
        found = weight_fingerprint(model)
        if found != metadata["fingerprint"]:
            raise TracekitError(f"edit file {path} was computed on {metadata['spec']} with weight fingerprint "
                                f"{metadata['fingerprint']}, but this model ({model.spec}) has {found}; load it onto the "
                                "unedited model it was made for")
        params = dict(model.hf.named_parameters())
        for name, digest in json.loads(metadata["originals"]).items():
            check(name in params, f"edit file {path} changes {name!r}, which this model does not have")
            if tensor_sha256(params[name]) != digest:
                raise TracekitError(f"edit file {path}: this model's {name} is not the weight the edit was computed on "
                                    "(another edit applied?); undo it first")
        device = {name: params[name].device for name in new}
        edit = cls(model.hf, {name: value.to(device[name]) for name, value in new.items()}, info=None, model=model)
        edit.info = json.loads(metadata["info"])
        return edit

    def _module_of(self, model) -> nn.Module:
        param = next(iter(self._params.values()))
        return model.hf if any(p is param for p in model.hf.parameters()) else None


EDIT_FORMAT = "tracekit-edit-1"


def tensor_sha256(tensor: torch.Tensor) -> str:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _info_record(info) -> dict:
    """What a saved edit says about itself: the EditInfo's scalars (no tensors)."""
    if info is None:
        return {}
    if hasattr(info, "row"):
        return {"method": info.method, "layers": list(info.layers), **info.row()}
    return dict(info) if isinstance(info, dict) else {"info": str(info)}


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
