"""``Edit``: a set of new weights that can be applied and undone bit for bit."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from tracekit.errors import check


class Edit:
    """New values for some parameters of a model.

    The originals are cloned when the Edit is made, so ``undo`` restores them exactly
    (``torch.equal``), whatever happened to the weights in between. Usable as a context
    manager: ``with edit: ...`` applies it and undoes it on exit.
    """

    def __init__(self, module: nn.Module, new_weights: Mapping[str, torch.Tensor], info: Any = None):
        params = dict(module.named_parameters())
        for name, value in new_weights.items():
            check(name in params, f"the model has no parameter {name!r}")
            check(params[name].shape == value.shape, f"new value for {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}")
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

    @torch.no_grad()
    def apply(self) -> "Edit":
        for name, param in self._params.items():
            param.copy_(self._new[name])
        self.applied = True
        return self

    @torch.no_grad()
    def undo(self) -> "Edit":
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
