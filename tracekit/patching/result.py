"""``PatchResult``: a sweep's numbers as a tensor, a DataFrame, heatmaps (matplotlib Figures, no
global backend switch) and a rich table."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from tracekit.errors import check
from tracekit.patching.engine import Patch
from tracekit.plotting import Plottable, pyplot

_BARS = " \u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"


def new_figure(width: float, height: float):
    """A constrained-layout Figure made by pyplot and closed there at once (tracekit.plotting's rule:
    Jupyter shows it inline once, nothing stays open, no backend switch)."""
    plt = pyplot()
    fig = plt.figure(figsize=(width, height), dpi=110, layout="constrained")
    plt.close(fig)
    return fig


@dataclass
class PatchResult(Plottable):
    """Metric values of every patch of a sweep.

    ``values`` [patches]: the metric averaged over noise samples (``per_sample`` keeps them);
    ``normalised``: (value - m_corrupt) / (m_clean - m_corrupt), so 0 is the corrupted run and 1
    the clean one in either direction (denoising: the fraction restored; noising: 1 - the fraction
    destroyed)."""

    model: str
    clean: str
    corrupt: str
    tokens: list[str]
    direction: str
    metric: str
    target: str
    foil: str | None
    m_clean: float
    m_corrupt: float
    window: int
    patches: list[Patch]
    per_sample: torch.Tensor  # [patches, samples]
    corrupted_span: tuple[int, int] | None = None
    config: dict = field(default_factory=dict)

    @property
    def values(self) -> torch.Tensor:
        return self.per_sample.mean(1)

    @property
    def normalised(self) -> torch.Tensor:
        gap = self.m_clean - self.m_corrupt
        if abs(gap) <= 1e-12:
            return torch.zeros_like(self.values)
        return (self.values - self.m_corrupt) / gap

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(p.kind for p in self.patches))

    def label(self, positions: tuple[int, ...]) -> str:
        text = "".join(self.tokens[t] for t in positions)
        span = self.corrupted_span
        star = "*" if span is not None and any(span[0] <= t < span[1] for t in positions) else ""
        return f"{text!r}{star}" if len(positions) == 1 else f"{positions[0]}..{positions[-1]} {text!r}{star}"

    # ---- tables ------------------------------------------------------------------------
    def to_frame(self):
        """One row per patch: site, layer (window centre), layers patched, position(s), token(s), head,
        value, normalised."""
        import pandas as pd

        values, normalised = self.values, self.normalised
        rows = []
        for i, p in enumerate(self.patches):
            rows.append({"site": p.kind, "layer": p.layer, "layers": f"{p.lo}-{p.hi - 1}",
                         "position": p.positions[0] if len(p.positions) == 1 else p.positions,
                         "token": "".join(self.tokens[t] for t in p.positions), "head": p.head,
                         "value": float(values[i]), "normalised": float(normalised[i]), "metric": self.metric,
                         "direction": self.direction})
        return pd.DataFrame(rows)

    def grid(self, site: str | None = None, normalised: bool = True) -> tuple[torch.Tensor, list[str], list[int]]:
        """(matrix, row labels, layers) for one site kind: rows are position sets, or heads where
        heads were swept at one position set; columns are window-centre layers."""
        kinds = self.kinds
        site = site or kinds[0]
        check(site in kinds, f"site {site!r} is not in this result ({', '.join(kinds)})")
        index = [i for i, p in enumerate(self.patches) if p.kind == site]
        layers = list(dict.fromkeys(self.patches[i].layer for i in index))
        positions = list(dict.fromkeys(self.patches[i].positions for i in index))
        heads = list(dict.fromkeys(self.patches[i].head for i in index))
        by_head = len(heads) > 1 and len(positions) == 1
        keys = heads if by_head else positions
        labels = [f"head {h}" for h in heads] if by_head else [self.label(p) for p in positions]
        if not by_head and len(heads) > 1:  # several heads and positions: show the first head
            index = [i for i in index if self.patches[i].head == heads[0]]
        data = self.normalised if normalised else self.values
        matrix = torch.full((len(keys), len(layers)), float("nan"))
        for i in index:
            p = self.patches[i]
            matrix[keys.index(p.head if by_head else p.positions), layers.index(p.layer)] = data[i]
        return matrix, labels, layers

    # ---- pictures ----------------------------------------------------------------------------
    def plot(self, ax=None, site: str | None = None, normalised: bool = True):
        """Heatmaps (rows: positions or heads; columns: layers), one per site kind, or only ``site``
        on ``ax``. Returns the matplotlib Figure; ``save(path)`` writes it."""
        kinds = [site] if site else self.kinds
        check(ax is None or len(kinds) == 1, "plot(ax=...) draws one site: pass site= too")
        if ax is None:
            n_rows = max(len(self.grid(k)[1]) for k in kinds)
            n_cols = max(len(self.grid(k)[2]) for k in kinds)
            fig = new_figure(min(16, 2.5 + 3.2 * len(kinds) * max(1.0, n_cols / 12)), 1.6 + 0.28 * n_rows)
            axes = fig.subplots(1, len(kinds), squeeze=False)[0]
        else:
            fig, axes = ax.figure, [ax]
        for axis, kind in zip(axes, kinds):
            matrix, labels, layers = self.grid(kind, normalised)
            image = axis.pcolormesh(matrix.numpy(), cmap="RdBu_r" if normalised else "viridis",
                                    vmin=-1 if normalised else None, vmax=1 if normalised else None)
            axis.invert_yaxis()
            axis.set_yticks([i + 0.5 for i in range(len(labels))], labels, fontsize=7)
            step = max(1, len(layers) // 10)
            axis.set_xticks([i + 0.5 for i in range(0, len(layers), step)], layers[::step], fontsize=7)
            axis.set_xlabel(f"layer ({kind}, window {self.window})", fontsize=8)
            versus = "" if self.foil is None else f" - {self.foil!r}"
            axis.set_title(f"{self.direction} {kind}: {self.metric} of {self.target!r}{versus}", fontsize=8)
            fig.colorbar(image, ax=axis).set_label("normalised" if normalised else self.metric, fontsize=7)
        fig.suptitle(f"{self.clean!r} vs {self.corrupt}", fontsize=8)
        return fig

    def caption(self) -> str:
        return f"{self.direction} patching {self.clean!r} vs {self.corrupt}: {self.metric} of {self.target!r}"

    def __rich__(self) -> Group:
        parts = [Text(f"{self.direction} patching {self.clean!r} vs {self.corrupt}: {self.metric} of "
                      f"{self.target!r}{'' if self.foil is None else ' vs ' + repr(self.foil)}: clean "
                      f"{self.m_clean:.4f}, corrupted {self.m_corrupt:.4f} (bars: normalised, 0 = corrupted, "
                      f"1 = clean; * corrupted tokens)", style="bold")]
        for kind in self.kinds:
            matrix, labels, layers = self.grid(kind)
            table = Table(title=kind)
            table.add_column("#", justify="right")
            table.add_column("patched")
            table.add_column(f"layers {layers[0]}..{layers[-1]}", no_wrap=True)
            table.add_column("max", justify="right")
            table.add_column("at", justify="right")
            for i, (label, row) in enumerate(zip(labels, matrix)):
                cells = Text()
                for value in row.nan_to_num(0).tolist():
                    a = max(0.0, min(1.0, value))
                    cells.append(_BARS[round(a * (len(_BARS) - 1))], style="blue" if value >= 0 else "red")
                best = int(row.nan_to_num(float("-inf")).argmax())
                table.add_row(str(i), label, cells, f"{float(row[best]):.3f}", str(layers[best]))
            parts.append(table)
        return Group(*parts)
