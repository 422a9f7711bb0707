"""The layers a multi-layer edit (MEMIT, FT-5) changes: a window centred on the edit layer,
by the same formula as a tracing window (layers l - w//2 .. l - w//2 + w - 1)."""

from __future__ import annotations

from tracekit.errors import check
from tracekit.tracing.plan import window_layers


def edit_window(model, layer: int, n_layers: int, clip: bool = False, method: str = "the edit") -> list[int]:
    """``n_layers`` consecutive layers centred on ``layer``.

    A window that leaves the model is an error, or with ``clip`` is cut at the model's edges, as
    tracing windows are (a sweep that edits the first and last layers, as the paper's does).
    """
    model.adapter.check_layer(model.hf, layer)
    check(isinstance(n_layers, int) and n_layers >= 1, f"a window needs at least one layer, got {n_layers!r}")
    check(clip or n_layers <= model.n_layers,
          f"a {n_layers}-layer window needs a model with at least {n_layers} layers; this one has {model.n_layers}")
    layers = list(window_layers(layer, n_layers, model.n_layers))  # already cut at the edges
    first = layer - n_layers // 2
    check(clip or len(layers) == n_layers,
          f"{method}'s {n_layers}-layer window centred on layer {layer} spans {first}..{first + n_layers - 1}, past this "
          f"model's layers 0..{model.n_layers - 1}; pick a layer in "
          f"{n_layers // 2}..{model.n_layers - 1 - (n_layers - 1 - n_layers // 2)} or set clip_window=True")
    return layers
