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

The memo is bounded in bytes per device (``memo_budget``): a float64 factor of GPT-J's 16384-wide keys
is 2 GiB, and MEMIT's windows over a sweep's layers touch every layer, so an entry-count bound let
the factors of one sweep fill a 140 GiB GPU. The least recently used factor goes first; making it
again costs one factorisation (0.08 s for GPT-J on an H200).

The memo key is (layer, what the statistics are, ridge, device): a statistics file's sha256 (from its
metadata) or, for a matrix given directly, its storage, version counter and a strided sample of its
values, so an in-place change of a given matrix makes a new factor. ``FACTORISATIONS`` counts the
factorisations made per layer (tests and benchmarks read it).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass

import torch

from tracekit.errors import check
from tracekit.memo import model_memo

FACTORISATIONS: Counter = Counter()  # layer -> factorisations made (memo misses), this process
INVERSES: Counter = Counter()  # layer -> reference-arithmetic inverses made
_MEMO = "key_factors"
MAX_ENTRIES = 64  # per model, on top of the byte budget (memo_budget); oldest dropped first
BUDGET_VARIABLE = "TRACEKIT_FACTOR_MEMO_GB"


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


def memo_budget(device) -> int:
    """Bytes the factor memo may hold on ``device``: $TRACEKIT_FACTOR_MEMO_GB if set, else a quarter
    of a GPU's memory (the rest is the model's, its activations' and the statistics being made),
    else 8 GiB of host memory."""
    given = os.environ.get(BUDGET_VARIABLE)
    if given:
        try:
            gigabytes = float(given)
        except ValueError:
            gigabytes = -1.0
        check(gigabytes >= 0, f"${BUDGET_VARIABLE} must be a number of GiB >= 0, got {given!r}")
        return int(gigabytes * 2**30)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return 8 * 2**30


def entry_bytes(value) -> int:
    """Memory held by a memo entry (a ``KeySolver`` or an inverse)."""
    if isinstance(value, KeySolver):
        return value.factor.nbytes + (value.pivots.nbytes if value.pivots is not None else 0)
    return value.nbytes


def _remember(table: dict, key, value):
    """Keep ``value``; drop the least recently used entries beyond MAX_ENTRIES or, on its device,
    beyond ``memo_budget`` bytes (the newest entry always stays: the caller is about to use it)."""
    table[key] = value
    device, budget = str(value.device), memo_budget(value.device)
    while True:
        others = [k for k in table if k != key]
        same_device = [k for k in others if str(table[k].device) == device]
        held = entry_bytes(value) + sum(entry_bytes(table[k]) for k in same_device)
        if len(table) > MAX_ENTRIES:
            table.pop(others[0])
        elif same_device and held > budget:
            table.pop(same_device[0])
        else:
            break
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
        table[key] = table.pop(key)  # most recently used last
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
