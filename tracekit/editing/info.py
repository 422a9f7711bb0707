"""``EditInfo``: what an editor reports about the edit it computed (``Edit.info``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EditInfo:
    method: str  # "rome", "memit", "ft-1", "ft-5"
    layers: list[int]  # every layer whose weights change
    seconds: dict[str, float]  # per phase, and "total"
    steps_taken: int  # optimiser steps (v* for ROME/MEMIT, weights for FT)
    losses: list[float]  # the objective before each step (+ the final pass for ROME/MEMIT)
    final_nll: float  # the target's NLL at the end
    engine: str = "hooks"  # "blocks" or "hooks" (see kv_core); FT: "blocks" or "forward"
    conventions: dict[str, Any] = field(default_factory=dict)  # the reference/tracekit choices that were in force
    noise: dict[str, Any] | None = None  # scale, rule and convention of the subject noise, if any
    details: dict[str, Any] = field(default_factory=dict)  # method specific (see each editor)

    def row(self) -> dict[str, Any]:
        """Scalars worth storing with a result (no tensors)."""
        out = {"steps_taken": self.steps_taken, "final_nll": self.final_nll, "engine": self.engine,
               **{f"seconds_{k}": v for k, v in self.seconds.items()}, **self.conventions}
        if self.noise:
            out.update(self.noise)
        return out
