"""Pictures for notebooks: plot(ax=None) -> Figure, save(path), Jupyter reprs, no backend switch,
labels inside the figure, matplotlib optional."""

import subprocess
import sys

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tracekit import TracekitError
from tracekit.analysis import figures
from tracekit.tracing import trace, zero_trace
from tracing_models import PROMPT, SUBJECT, one_thread, sharp  # noqa: F401

PNG = b"\x89PNG\r\n\x1a\n"
LONG_PROMPT = "In a rather long sentence about travel and history, The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def results():
    model = sharp("random:gpt2-tiny")
    return (trace(model, PROMPT, SUBJECT, " Paris", window=2, samples=2, noise=0.5),
            zero_trace(model, LONG_PROMPT, SUBJECT, window=2))


@pytest.fixture(autouse=True)
def no_backend_switch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tracekit must not choose matplotlib's backend")

    monkeypatch.setattr(matplotlib, "use", refuse)  # (pyplot itself resolves the default backend once)


def test_plot_returns_a_figure_that_pyplot_does_not_keep(results):
    before = plt.get_fignums()
    for result in results:
        fig = result.plot()
        assert isinstance(fig, Figure) and len(fig.axes) == 2  # the heatmap and its colour bar
    assert plt.get_fignums() == before  # a notebook cell shows a returned figure once; no leaks


def test_plot_draws_into_a_given_axes(results):
    fig, (left, right) = plt.subplots(1, 2)
    try:
        assert results[0].plot(ax=left) is fig and results[1].plot(ax=right) is fig
        assert left.get_title().startswith("restoring") and right.get_title().startswith("zeroing")
        assert len(left.collections) == 1  # the heatmap
    finally:
        plt.close(fig)


def test_save_writes_the_file_and_plot_refuses_a_path(results, tmp_path):
    trace_result, zero_result = results
    assert trace_result.save(tmp_path / "sub" / "t.png").read_bytes()[:8] == PNG
    assert zero_result.save(tmp_path / "z.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(TracekitError, match=r"save\('t.png'\)"):
        trace_result.plot("t.png")
    with pytest.raises(TracekitError, match="must be a matplotlib Axes"):
        trace_result.plot(ax=3)


def test_jupyter_reprs(results):
    for result in results:
        assert result._repr_png_()[:8] == PNG
        page = result._repr_html_()
        assert "data:image/png;base64," in page and result.answer.strip() in page


@pytest.mark.parametrize("which", (0, 1))
def test_every_label_lies_inside_the_figure(results, which):
    """The zeroing plot clipped its row label and title; constrained layout and a width from the
    labels and title keep every text inside the canvas."""
    fig = results[which].plot()
    canvas = FigureCanvasAgg(fig)  # what a PNG is drawn with (the figure is closed in pyplot)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    for ax in fig.axes:  # an axes' tight box holds its drawn tick labels, axis labels and title
        drawn = ax.get_tightbbox(renderer)
        assert drawn.x0 >= box.x0 - 0.5 and drawn.x1 <= box.x1 + 0.5, (ax.get_title(), drawn, box)
        assert drawn.y0 >= box.y0 - 0.5 and drawn.y1 <= box.y1 + 0.5, (ax.get_title(), drawn, box)
    assert fig.axes[0].get_yticklabels()[0].get_text() and fig.axes[0].get_title()


def test_analysis_figures_return_figures_and_take_an_axes(tmp_path):
    by_layer = pd.DataFrame({"model": "m", "kind": "mlp", "window": 5, "layer": [0, 1, 2], "mean": [0.1, 0.3, 0.2],
                             "sem": [0.01, 0.02, 0.01]})
    fig = figures.effect_by_layer(by_layer)
    assert isinstance(fig, Figure) and fig.axes[0].get_lines()
    assert figures.save(fig, tmp_path / "f.png").read_bytes()[:8] == PNG
    points = pd.DataFrame({"tracing_effect": [0.1, 0.5, 0.9], "rewrite": [0.2, 0.4, 0.8]})
    own, ax = plt.subplots()
    try:
        assert figures.score_vs_tracing(points, 0.9, 0.01, ax=ax) is own
    finally:
        plt.close(own)
    grid = pd.DataFrame({"problem": ["error-injection"], "method": ["rome"], "r2_tracing": [0.01], "r2_layer": [0.9],
                         "r2_layer_x_tracing": [0.91]})
    assert len(figures.r2_bars(grid).axes[0].patches) == 3
    per_layer = pd.DataFrame({"problem": "p", "method": "rome", "layer": [0, 1], "rho": [0.1, -0.2]})
    assert isinstance(figures.correlation_by_layer(per_layer), Figure)
    assert plt.get_fignums() == []


def test_matplotlib_stays_optional(results, monkeypatch):
    code = "import sys, tracekit.tracing, tracekit.analysis, tracekit.cli; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # as if not installed
    with pytest.raises(TracekitError, match=r"pip install 'tracekit\[plot\]'"):
        results[0].plot()
    assert results[0]._repr_png_() is None
    assert "p_clean" in results[0]._repr_html_()
