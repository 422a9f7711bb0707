"""The paper's figures as PNG files (matplotlib, Agg backend: no screen needed)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from tracekit.errors import TracekitError

        raise TracekitError("figures need matplotlib: pip install 'tracekit[plot]'") from None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    _pyplot().close(fig)
    return path


def effect_by_layer(table: pd.DataFrame, path: str | Path, title: str = "Tracing effect by layer") -> Path:
    """Fig. 1/2/10: mean effect (± s.e.) per layer, one line per kind and window."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for (model, kind, window), part in table.groupby(["model", "kind", "window"], sort=True):
        label = f"{kind}, window {window}" + (f" ({model.split('#')[0]})" if table["model"].nunique() > 1 else "")
        ax.plot(part["layer"], part["mean"], marker="o", ms=3, label=label)
        ax.fill_between(part["layer"], part["mean"] - part["sem"].fillna(0), part["mean"] + part["sem"].fillna(0),
                        alpha=0.2)
    ax.set(xlabel="layer (0-based, centre of the restored window)", ylabel="tracing effect (fraction restored)",
           title=title, ylim=(0, None))
    ax.legend(fontsize=8)
    return _save(fig, path)


def score_vs_tracing(df: pd.DataFrame, path: str | Path, rho: float, p: float, outcome: str = "rewrite",
                     title: str = "") -> Path:
    """Fig. 4: edit score against tracing effect at one layer, with the y = x line of a perfect link."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.scatter(df["tracing_effect"], df[outcome], s=10, alpha=0.6)
    ax.plot([0, 1], [0, 1], "r:", label="perfect relationship")
    ax.set(xlabel="tracing effect", ylabel=f"{outcome} score", title=f"{title}\nrho = {rho:.3f}, p = {p:.2g}")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def r2_bars(grid: pd.DataFrame, path: str | Path, outcome: str = "rewrite") -> Path:
    """Fig. 6: R^2 of the layer-only and layer x tracing models for each problem x method."""
    plt = _pyplot()
    labels = [f"{p}\n{m}" for p, m in zip(grid["problem"], grid["method"])]
    x = range(len(grid))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(grid) + 1.5), 3.8))
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
    return _save(fig, path)


def correlation_by_layer(table: pd.DataFrame, path: str | Path, outcome: str = "rewrite") -> Path:
    """Fig. 15: correlation of edit score and tracing effect at each edit layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for (problem, method), part in table.groupby(["problem", "method"], sort=True):
        ax.plot(part["layer"], part["rho"], marker="o", ms=3, label=f"{method}, {problem}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="edit layer (0-based)", ylabel=f"rho({outcome}, tracing effect)", ylim=(-1, 1),
           title="Correlation per layer")
    ax.legend(fontsize=7)
    return _save(fig, path)
