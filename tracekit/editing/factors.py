"""Factorisations of the key statistics, made once per (model, layer, statistics) and reused.

Every ROME and MEMIT update needs A^-1 K for A = C + ridge x (trace(C) / d) x I and a few keys K
(``kv_core.solve_update``): ROME's C^-1 k*, and MEMIT's (lam C + K K^T)^-1 K, which the push-through
identity turns into C^-1 K (lam I + K^T C^-1 K)^-1, a low-rank update of the same factored matrix.
C of a layer never changes during a sweep, so the factorisation of A (a Cholesky factor in float64,
or an LU factor where C is not positive definite) is computed once on the model's device and kept
in the model's memo table (``tracekit.memo``); every later update is two triangular solves (for a
d x d matrix, O(d^2) per key instead of O(d^3)). A direct solve of MEMIT's lam C + K K^T per edit
would pay the O(d^3) factorisation every time (benchmarks/results/editing-cpu-*.md measures both).

The reference code's arithmetic (``mom2_solve="inverse"``: torch.inverse of C in its own dtype, cast
to float32) is kept too; its inverse is memoised the same way, so it is computed once per layer as well.

The memo key is (layer, what the statistics are, ridge, device): a statistics file's sha256 (from its
metadata) or, for a matrix given directly, its storage, version counter and a strided sample of its
values, so an in-place change of a given matrix makes a new factor. ``FACTORISATIONS`` counts the
factorisations made per layer (tests and benchmarks read it).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import torch

from tracekit.errors import check
from tracekit.memo import model_memo

FACTORISATIONS: Counter = Counter()  # layer -> factorisations made (memo misses), this process
INVERSES: Counter = Counter()  # layer -> reference-arithmetic inverses made
_MEMO = "key_factors"
MAX_ENTRIES = 64  # per model: a sweep's layers (MEMIT windows included) fit; oldest dropped first


@dataclass(frozen=True)
class KeySolver:
    """A^-1 X by a factorisation of A made once (``factorise``)."""

    kind: str  # "cholesky" or "lu"
    factor: torch.Tensor  # float64, on A's device
    pivots: torch.Tensor | None = None  # LU only

    @property
    def device(self) -> torch.device:
        return self.factor.device

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """A^-1 X for X [d, n] (float64, on the factor's device)."""
        X = X.to(self.factor.device, torch.float64)
        if self.kind == "cholesky":
            return torch.cholesky_solve(X, self.factor)
        return torch.linalg.lu_solve(self.factor, self.pivots, X)


def ridged(C: torch.Tensor, ridge: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A = C + ridge x (trace(C) / d) x I in ``dtype`` on ``device`` (default: C's)."""
    A = C.to(device if device is not None else C.device, dtype)
    if ridge:
        A = A + ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return A


def factorise(C: torch.Tensor, ridge: float = 0.0, device=None) -> KeySolver:
    """Cholesky factor of A in float64 (LU where A is not numerically positive definite)."""
    A = ridged(C, ridge, torch.float64, device)
    check(bool(torch.isfinite(A).all()), "the key statistics hold NaN or inf values")
    factor, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return KeySolver("cholesky", factor)
    lu, pivots = torch.linalg.lu_factor(A)
    return KeySolver("lu", lu, pivots)


def matrix_identity(C: torch.Tensor) -> str:
    """What a given (not file-backed) matrix is, cheaply: its storage, version and a value sample."""
    flat = C.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step][:4096].to("cpu", torch.float64).numpy().tobytes()
    where = f"{C.data_ptr()}:{C._version}:{tuple(C.shape)}:{C.dtype}:{C.device}"
    return "given-" + hashlib.sha256(where.encode() + sample).hexdigest()[:16]


def _table(model) -> dict:
    return model_memo(model, _MEMO)


def _remember(table: dict, key, value):
    table[key] = value
    while len(table) > MAX_ENTRIES:
        table.pop(next(iter(table)))
    return value


def key_solver(model, layer: int, C: torch.Tensor, ridge: float = 0.0, identity: str | None = None) -> KeySolver:
    """The memoised factorisation of layer ``layer``'s A on the model's device (module doc)."""
    device = model.device
    key = ("solver", layer, identity or matrix_identity(C), float(ridge), str(device))
    table = _table(model)
    if key in table:
        table[key] = table.pop(key)  # most recently used last
        return table[key]
    FACTORISATIONS[layer] += 1
    return _remember(table, key, factorise(C, ridge, device))


def key_inverse(model, layer: int, C: torch.Tensor, dtype: str, ridge: float = 0.0,
                identity: str | None = None) -> torch.Tensor:
    """The reference code's C^-1: torch.inverse of A in ``dtype``, cast to float32; memoised."""
    device = model.device
    key = ("inverse", layer, identity or matrix_identity(C), dtype, float(ridge), str(device))
    table = _table(model)
    if key in table:
        return table[key]
    INVERSES[layer] += 1
    return _remember(table, key, torch.inverse(ridged(C, ridge, getattr(torch, dtype), device)).float())


@dataclass(frozen=True)
class LayerStats:
    """One layer's key statistics as an editor uses them: C, what it is, and its memoised solvers."""

    model: object
    layer: int
    matrix: torch.Tensor  # C = E[k k^T], [d_in, d_in]
    identity: str  # a statistics file's sha256, or ``matrix_identity`` of a given matrix

    def solver(self, ridge: float = 0.0) -> KeySolver:
        return key_solver(self.model, self.layer, self.matrix, ridge, self.identity)

    def inverse(self, dtype: str, ridge: float = 0.0) -> torch.Tensor:
        return key_inverse(self.model, self.layer, self.matrix, dtype, ridge, self.identity)
