"""What a table's numbers can carry: ceiling and floor shares, degenerate layers, and the paper's
practical check (edit each fact where its tracing effect peaks, or always at one layer?).

An R^2 from rows that all score 0.99 says nothing about tracing, and a layer where every point
scores the same (ROME at the last layer scores 0 for every fact) hands the layer-only model a
contrast that makes its R^2 look large. These flags go beside every R^2 table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from tracekit.errors import TracekitError

CEILING = 0.98  # a score at or above this has no room left to vary
FLOOR = 0.02
DEGENERATE_SD = 0.01  # a layer whose outcome varies less than this over points is degenerate


def degenerate_layers(df: pd.DataFrame, outcome: str = "rewrite", sd: float = DEGENERATE_SD) -> list[int]:
    """Layers where ``outcome`` is (nearly) the same for every point (standard deviation < ``sd``)."""
    spread = df.groupby("layer")[outcome].std(ddof=0)
    return sorted(int(layer) for layer, value in spread.items() if value < sd)


def outcome_flags(df: pd.DataFrame, outcome: str = "rewrite") -> dict:
    """Share of rows at the ceiling (>= CEILING) and floor (<= FLOOR), and the degenerate layers."""
    values = df[outcome].dropna()
    n = max(len(values), 1)
    return {"at_ceiling": float((values >= CEILING).sum() / n), "at_floor": float((values <= FLOOR).sum() / n),
            "degenerate_layers": " ".join(map(str, degenerate_layers(df, outcome)))}


def peak_layer_check(joined: pd.DataFrame, outcome: str = "rewrite", fixed_layer: int | None = None,
                     by: tuple[str, ...] = ("problem", "method")) -> pd.DataFrame:
    """The paper's practical question: does editing each fact at the layer where its tracing effect
    peaks beat editing every fact at one fixed layer?

    Per group, over the points edited at every layer of the group: the mean ``outcome`` at each
    point's peak-tracing layer (among the edited layers; ties go to the lower layer), at
    ``fixed_layer`` (default: the group's best layer on average, which flatters the fixed choice
    a little since it is picked on the same data), and at each point's best layer (the oracle,
    for scale). ``p`` is a two-sided Wilcoxon signed-rank test of peak vs fixed. A group not edited
    at ``fixed_layer`` is left out.
    """
    rows, missing = [], []
    for group, part in joined.groupby(list(by), sort=True):
        group = group if isinstance(group, tuple) else (group,)
        wide = part.pivot_table(index="case_id", columns="layer", values=[outcome, "tracing_effect"],
                                aggfunc="first").dropna()
        if len(wide) < 2:
            continue
        scores, effects = wide[outcome], wide["tracing_effect"]
        layers = scores.columns.to_numpy()
        peak = layers[np.argmax(effects.to_numpy(), axis=1)]
        at_peak = scores.to_numpy()[np.arange(len(scores)), np.argmax(effects.to_numpy(), axis=1)]
        fixed = int(scores.mean().idxmax()) if fixed_layer is None else fixed_layer
        if fixed not in layers:  # this group was edited at other layers; the others still make a table
            missing.append(f"layer {fixed} was not edited for {', '.join(map(str, group))} "
                           f"(edited: {', '.join(map(str, layers))})")
            continue
        at_fixed = scores[fixed].to_numpy()
        diff = at_peak - at_fixed
        p = float(sps.wilcoxon(at_peak, at_fixed).pvalue) if np.any(np.abs(diff) > 1e-12) else 1.0
        rows.append({**dict(zip(by, group)), "points": len(wide), "at_peak": float(at_peak.mean()),
                     "fixed_layer": fixed, "at_fixed": float(at_fixed.mean()), "peak_minus_fixed": float(diff.mean()),
                     "p": p, "peak_beats_fixed": float((diff > 1e-12).mean()),
                     "oracle": float(scores.max(axis=1).mean()),
                     "peak_layers": " ".join(f"{int(l)}:{int(c)}" for l, c in zip(*np.unique(peak, return_counts=True)))})
    if not rows:
        raise TracekitError(missing[0] if missing else
                            f"no group of {', '.join(by)} has points edited at every layer for the peak-layer check")
    return pd.DataFrame(rows)


def window_holds_layer_zero(layer: int, window: int) -> bool:
    """Whether the window centred on ``layer`` restores layer 0 (where MLP 0 can act as part of the embedding)."""
    from tracekit.tracing.plan import window_layers

    return 0 in window_layers(layer, window, layer + window + 1)


__all__ = ["CEILING", "DEGENERATE_SD", "FLOOR", "degenerate_layers", "outcome_flags", "peak_layer_check",
           "window_holds_layer_zero"]
