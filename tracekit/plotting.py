"""Figures for notebooks and files: the one place tracekit touches matplotlib's state.

Every result with a picture has ``plot(ax=None)`` returning a matplotlib ``Figure`` (drawn into
``ax`` when one is given), ``save(path)`` writing it (PNG, SVG or PDF by the suffix), and
``_repr_png_`` / ``_repr_html_`` so that Jupyter shows the result itself inline.

No backend is ever chosen here: matplotlib picks its own (Agg on a machine without a screen,
the inline backend in Jupyter). A figure made here comes from pyplot, so that Jupyter's inline
backend is loaded and displays it, and is closed at once: pyplot keeps no reference, a notebook
cell that returns it shows it once (an open pyplot figure is shown a second time when the cell
ends), and a script making hundreds of figures leaks none. ``ax=`` is the way to compose
tracekit's pictures into a figure of your own (pyplot then manages it as usual).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from tracekit.errors import TracekitError


def pyplot():
    """matplotlib.pyplot, or a one-line error saying how to install it (it is an optional extra)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise TracekitError("plotting needs matplotlib: pip install 'tracekit[plot]'") from None
    return plt


def figure_and_axes(ax=None, figsize: tuple[float, float] = (6.4, 4.0)):
    """``(figure, axes)``: ``ax`` and its figure, or a new constrained-layout figure (closed in
    pyplot at once, see the module's note) with one axes."""
    if ax is not None:
        if isinstance(ax, (str, Path)):
            raise TracekitError(f"plot() draws into a matplotlib Axes and returns the Figure; to write a file "
                                f"call save({str(ax)!r})")
        if not hasattr(ax, "figure") or not hasattr(ax, "pcolormesh"):
            raise TracekitError(f"ax must be a matplotlib Axes, got a {type(ax).__name__}")
        return ax.figure, ax
    plt = pyplot()
    fig = plt.figure(figsize=figsize, layout="constrained")
    plt.close(fig)
    return fig, fig.add_subplot()


def save_figure(fig, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix), making the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def png_bytes(fig, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class Plottable:
    """Mixin: ``save`` and Jupyter's reprs, from a subclass's ``plot(ax=None)`` and ``caption()``."""

    def plot(self, ax=None):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def caption(self) -> str:
        """One line on what the picture shows (the HTML repr's heading)."""
        return type(self).__name__

    def save(self, path: str | Path, dpi: int = 150, **plot_options) -> Path:
        """Write ``plot(**plot_options)``'s figure to ``path`` (PNG, SVG or PDF by the suffix); returns the path."""
        return save_figure(self.plot(**plot_options), path, dpi)

    def _repr_png_(self) -> bytes | None:
        try:
            return png_bytes(self.plot())
        except TracekitError:  # no matplotlib: Jupyter falls back to the next representation
            return None

    def _repr_html_(self) -> str | None:
        png = self._repr_png_()
        heading = f"<p style='font-family:monospace'>{html.escape(self.caption())}</p>"
        if png is None:
            return heading
        return f"<div>{heading}<img src='data:image/png;base64,{base64.b64encode(png).decode()}'/></div>"


__all__ = ["Plottable", "figure_and_axes", "png_bytes", "pyplot", "save_figure"]
