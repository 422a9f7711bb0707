"""The paper's figures as matplotlib Figures (``tracekit.plotting``: no backend switch).

Each function draws into ``ax`` when one is given (else a new figure) and returns the Figure;
``save(fig, path)`` writes one to a file. In Jupyter a returned Figure shows inline.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tracekit.plotting import figure_and_axes, save_figure


def save(fig, path: str | Path) -> Path:
    """Write a figure made here to ``path`` (PNG, SVG or PDF by the suffix); returns the path."""
    return save_figure(fig, path, dpi=130)


def effect_by_layer(table: pd.DataFrame, title: str = "Tracing effect by layer", ax=None):
    """Fig. 1/2/10: mean effect (± s.e.) per layer, one line per kind and window."""
    fig, ax = figure_and_axes(ax, figsize=(6.5, 3.6))
    for (model, kind, window), part in table.groupby(["model", "kind", "window"], sort=True):
        label = f"{kind}, window {window}" + (f" ({model.split('#')[0]})" if table["model"].nunique() > 1 else "")
        ax.plot(part["layer"], part["mean"], marker="o", ms=3, label=label)
        ax.fill_between(part["layer"], part["mean"] - part["sem"].fillna(0), part["mean"] + part["sem"].fillna(0),
                        alpha=0.2)
    ax.set(xlabel="layer (0-based, centre of the restored window)", ylabel="tracing effect (fraction restored)",
           title=title, ylim=(0, None))
    ax.legend(fontsize=8)
    return fig


def score_vs_tracing(df: pd.DataFrame, rho: float, p: float, outcome: str = "rewrite", title: str = "",
                     ax=None):
    """Fig. 4: edit score against tracing effect at one layer, with the y = x line of a perfect link."""
    fig, ax = figure_and_axes(ax, figsize=(4.6, 4.2))
    ax.scatter(df["tracing_effect"], df[outcome], s=10, alpha=0.6)
    ax.plot([0, 1], [0, 1], "r:", label="perfect relationship")
    ax.set(xlabel="tracing effect", ylabel=f"{outcome} score", title=f"{title}\nrho = {rho:.3f}, p = {p:.2g}")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def r2_bars(grid: pd.DataFrame, outcome: str = "rewrite", ax=None):
    """Fig. 6: R^2 of the layer-only and layer x tracing models for each problem x method."""
    # one word a line: "fact-amplification" on one line overlaps its neighbours once there are 18 cells
    labels = ["\n".join([*p.split("-"), m]) for p, m in zip(grid["problem"], grid["method"])]
    x = range(len(grid))
    fig, ax = figure_and_axes(ax, figsize=(max(5.0, 0.9 * len(grid) + 1.5), 3.8))
    width = 0.27
    series = [("r2_tracing", "tracing only"), ("r2_layer", "layer"), ("r2_layer_x_tracing", "layer x tracing")]
    for offset, (column, label) in zip((-width, 0, width), series):
        bars = ax.bar([i + offset for i in x], grid[column], width, label=label)
        for bar, value in zip(bars, grid[column]):
            ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=6)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set(ylabel=f"R² ({outcome} score)", ylim=(0, 1.08), title=f"Variance in {outcome} score explained")
    ax.legend(fontsize=7)
    return fig


def correlation_by_layer(table: pd.DataFrame, outcome: str = "rewrite", ax=None):
    """Fig. 15: correlation of edit score and tracing effect at each edit layer."""
    fig, ax = figure_and_axes(ax, figsize=(6.5, 3.6))
    for (problem, method), part in table.groupby(["problem", "method"], sort=True):
        ax.plot(part["layer"], part["rho"], marker="o", ms=3, label=f"{method}, {problem}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="edit layer (0-based)", ylabel=f"rho({outcome}, tracing effect)", ylim=(-1, 1),
           title="Correlation per layer")
    ax.legend(fontsize=7)
    return fig
