"""Permutation tests of "does tracing add to layer?" with points, not rows, as the unit.

A point (fact) is edited at every layer of a sweep, so its rows share whatever makes that fact
easy or hard to edit, and a row-wise F-test treats 9 correlated rows as 9 facts. Here whole
tracing profiles (a point's effects at all layers) are shuffled among points and the models
refitted; the observed added R^2 is compared with that null distribution. The same null gives
the chance level of added R^2: what tracing "adds" when it carries nothing about the point.

With ``within`` (e.g. "relation"), both models get one intercept per (group, layer) cell and
profiles are shuffled only among points of the same group: a pooled effect that only reflects
groups differing in both tracing and editability then disappears.

With ``covariates`` (per-point columns, e.g. the log-probabilities of o_true before and under
the noise), both models also get one slope per (covariate, layer), and profiles are shuffled
with each point keeping its covariates: what tracing adds beyond what those numbers predict.

The layer x tracing model is a separate regression per layer (intercepts per cell when grouped,
covariate slopes, one tracing slope per layer): with the same point-level controls Z at every
layer, the tracing slope explains (r_y . r_t)^2 / (r_t . r_t) beyond them, r_* being residuals on
Z, so every permutation is computed at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

CHANCE_QUANTILE = 0.95


@dataclass(frozen=True)
class PermutationTest:
    points: int  # points with a result at every layer (the only ones used)
    added: float  # observed R^2 added by tracing over the intercepts, on those points
    p: float  # share of permutations (observed included) adding at least as much
    null: np.ndarray  # added R^2 under each permutation

    @property
    def chance(self) -> float:
        """The added R^2 that shuffled profiles reach in 95% of permutations (the chance level)."""
        return float(np.quantile(self.null, CHANCE_QUANTILE))


def profile_permutation(data: pd.DataFrame, outcome: str = "rewrite", *, within: str | None = None,
                        covariates: tuple[str, ...] = (), permutations: int = 1999, seed: int = 0,
                        min_points: int = 10) -> PermutationTest | None:
    """Permutation test of the layer (x ``within``, + layer x ``covariates``) vs + layer x tracing
    models; None with fewer than ``min_points`` points that have every layer of ``data`` and every
    covariate (with ``within``: or one group only). A covariate is a point's: its first row's value."""
    columns = [outcome, "tracing_effect"]
    wide = data.pivot_table(index="case_id", columns="layer", values=columns, aggfunc="first").dropna()
    per_point = data.groupby("case_id")[list(covariates)].first().loc[wide.index].dropna()
    wide = wide.loc[per_point.index]
    y, t = wide[outcome].to_numpy(), wide["tracing_effect"].to_numpy()  # (points, layers) each
    if len(y) < min_points:
        return None
    groups = None
    if within is not None:
        labels = data.groupby("case_id")[within].first().loc[wide.index]
        groups = pd.factorize(labels)[0]
        if groups.max() < 1:
            return None
    rng = np.random.default_rng(seed)
    orders = np.stack([np.arange(len(t))] + [_shuffle(rng, len(t), groups) for _ in range(permutations)])
    explained, total = _explained_by_slopes(y, t[orders], _controls(len(y), groups, per_point.to_numpy(float)))
    added = explained / total
    # Ties within float round-off count as "as extreme", so a profile-free outcome gives p = 1.
    p = float((added[1:] >= added[0] - 1e-12 * (1 + abs(added[0]))).sum() + 1) / (permutations + 1)
    return PermutationTest(points=len(y), added=float(added[0]), p=p, null=added[1:])


def _shuffle(rng: np.random.Generator, n: int, groups: np.ndarray | None) -> np.ndarray:
    if groups is None:
        return rng.permutation(n)
    order = np.arange(n)
    for g in range(groups.max() + 1):
        members = np.flatnonzero(groups == g)
        order[members] = members[rng.permutation(len(members))]
    return order


def _controls(n: int, groups: np.ndarray | None, covariates: np.ndarray) -> np.ndarray:
    """An orthonormal basis (points, k) of the per-layer controls: the intercepts (one per group)
    and the covariates. Directions the rest already span (a covariate constant within every
    group, say) are dropped, as least squares with the pseudo-inverse does."""
    intercepts = np.ones((n, 1)) if groups is None else np.eye(groups.max() + 1)[groups]
    design = np.hstack([intercepts, covariates.reshape(n, -1)])
    u, singular, _ = np.linalg.svd(design, full_matrices=False)
    return u[:, singular > 1e-10 * singular.max()]


def _residual(x: np.ndarray, basis: np.ndarray, axis: int) -> np.ndarray:
    """x minus its projection on ``basis`` (points, k) along the points ``axis``: the residual of
    regressing x on the controls (with intercepts only: x minus its (group) mean)."""
    moved = np.moveaxis(x, axis, -1)  # (..., points)
    return np.moveaxis(moved - (moved @ basis) @ basis.T, -1, axis)


def _explained_by_slopes(y: np.ndarray, t: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, float]:
    """Sum of squares the per-layer tracing slopes explain beyond the controls (``_controls``), for
    each t in a batch; and the total sum of squares of y.

    y: (points, layers); t: (batch, points, layers). A layer where t is a combination of the
    controls (constant, say) adds no slope, as least squares with the pseudo-inverse does."""
    yc = _residual(y, basis, axis=0)
    tc = _residual(t, basis, axis=1)
    sxx = (tc ** 2).sum(axis=1)  # (batch, layers)
    sxy = (tc * yc).sum(axis=1)
    explained = np.divide(sxy ** 2, sxx, out=np.zeros_like(sxx), where=sxx > 1e-12 * (1 + sxx.max()))
    return explained.sum(axis=1), float(((y - y.mean()) ** 2).sum())


__all__ = ["CHANCE_QUANTILE", "PermutationTest", "profile_permutation"]
