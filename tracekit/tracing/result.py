"""Results of a trace or a zeroing run: numbers, tidy rows, a heatmap, JSON, a terminal table."""

from __future__ import annotations

import json
import textwrap
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from tracekit.errors import TracekitError, check
from tracekit.plotting import Plottable
from tracekit.tracing.noise import noise_scale_info
from tracekit.tracing.plan import indistinguishable, tracing_effect

# ROME's colours per kind: effects fade from white to this.
_COLOURS = {"mlp": (0, 128, 0), "attn": (200, 0, 0), "resid": (110, 50, 160)}
_CMAPS = {"mlp": "Greens", "attn": "Reds", "resid": "Purples"}
# Bar heights carry the value where colour is lost (a log file, a plain terminal).
_BARS = " \u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"


@dataclass
class _LayerMap(Plottable):
    """Fields shared by tracing and zeroing results."""

    model: str
    prompt: str
    subject: str
    tokens: list[str]
    subject_span: tuple[int, int]
    answer: str
    answer_id: int
    target: str | None
    p_clean: float
    config: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.config.get("kind", "mlp")

    @property
    def n_layers(self) -> int:
        return self.effect.shape[-1]

    def is_subject(self, position: int) -> bool:
        return self.subject_span[0] <= position < self.subject_span[1]

    # ---- serialisation -------------------------------------------------------------
    def to_json(self, path: str | Path | None = None) -> str:
        data = {"type": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            data[f.name] = value.tolist() if isinstance(value, torch.Tensor) else value
        text = json.dumps(data, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        data = json.loads(text)
        kind = data.pop("type", cls.__name__)
        check(kind == cls.__name__, f"this JSON holds a {kind}, not a {cls.__name__}")
        for f in fields(cls):
            if f.name.startswith("p_") and isinstance(data.get(f.name), list):
                data[f.name] = torch.tensor(data[f.name])
        data["subject_span"] = tuple(data["subject_span"])
        return cls(**data)

    # ---- pictures ------------------------------------------------------------------
    def _heatmap(self, matrix: torch.Tensor, labels: list[str], title: str, label: str, vmin: float, ax):
        """ROME-style heatmap (rows = labels, columns = layers) as a matplotlib Figure."""
        from matplotlib.ticker import FormatStrFormatter, MaxNLocator

        from tracekit.plotting import figure_and_axes

        title = "\n".join(textwrap.fill(line, 64) for line in title.splitlines())  # long prompts wrap
        label_in = 0.3 + 0.07 * max(map(len, labels))  # row labels, left of the cells
        title_in = 0.075 * max(len(line) for line in title.splitlines())  # at fontsize 9, centred on the cells
        width_in = max(3 + 0.18 * matrix.shape[1] + label_in, label_in + title_in + 0.5)
        flat = len(labels) <= 2  # a colour bar beside one row could not hold its own label: put it below
        fig, ax = figure_and_axes(ax, figsize=(width_in, 2.7 if flat else 1.7 + 0.3 * len(labels)))
        image = ax.pcolormesh(matrix.numpy(), cmap=_CMAPS.get(self.kind, "Greens"), vmin=vmin)
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(labels))], labels)
        step = max(1, matrix.shape[1] // 10)
        ax.set_xticks([i + 0.5 for i in range(0, matrix.shape[1], step)], list(range(0, matrix.shape[1], step)))
        ax.set_xlabel(f"window centre layer ({self.kind}, window {self.config.get('window')})")
        ax.set_title(title, fontsize=9)
        bar = fig.colorbar(image, ax=ax, location="bottom" if flat else "right")
        bar.set_label(label)
        bar.locator = MaxNLocator(4)  # a flat bar's tick labels would run into each other
        bar.formatter = FormatStrFormatter("%.3g")
        bar.update_ticks()
        return fig

    def _table(self, title: str, labels: list[str], matrix: torch.Tensor) -> Group:
        table = Table()
        table.add_column("#", justify="right")
        table.add_column("token")
        table.add_column(f"layers 0..{matrix.shape[1] - 1}", no_wrap=True)
        table.add_column("max", justify="right")
        table.add_column("at", justify="right")
        top = float(matrix.max()) or 1.0
        r, g, b = _COLOURS.get(self.kind, _COLOURS["mlp"])
        for i, (label, row) in enumerate(zip(labels, matrix)):
            cells = Text()
            for value in row.tolist():
                a = max(0.0, min(1.0, value / top))
                mix = (int(255 + (r - 255) * a), int(255 + (g - 255) * a), int(255 + (b - 255) * a))
                cells.append(_BARS[round(a * (len(_BARS) - 1))], style=f"rgb({mix[0]},{mix[1]},{mix[2]})")
            table.add_row(str(i), label, cells, f"{float(row.max()):.3f}", str(int(row.argmax())))
        return Group(Text(title, style="bold"), table)


@dataclass
class TraceResult(_LayerMap):
    """Causal tracing of one prompt: p_restore[row, layer] for the restored tokens ``positions``."""

    p_noise: float = 0.0
    positions: list[int] = field(default_factory=list)
    p_restore: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))

    @classmethod
    def build(cls, model, prompt, settings, positions, p_clean, p_noise, p_restore, *, engine, noise_scale,
              target=None):
        scale = noise_scale_info(model, settings.noise)  # where s3's std came from (known_1000 or the fallback)
        config = {**settings.as_dict(), "engine": engine, "noise_scale": float(noise_scale),
                  "noise_embedding_std": scale.embedding_std, "noise_std_subjects": scale.subjects,
                  "backend": model.backend.name, "n_layers": model.n_layers}
        if indistinguishable(p_clean, p_noise):
            warnings.warn(f"p_clean == p_noise ({p_clean:.4g}) for {prompt.text!r}: tracing effects set to 0",
                          stacklevel=3)
        return cls(model=model.spec, prompt=prompt.text, subject=prompt.subject, tokens=list(prompt.tokens),
                   subject_span=tuple(prompt.span), answer=prompt.answer, answer_id=prompt.answer_id,
                   target=target, p_clean=float(p_clean), config=config, p_noise=float(p_noise),
                   positions=list(positions), p_restore=p_restore.float())

    @property
    def effect(self) -> torch.Tensor:
        """Fraction restored per (row, layer), clipped at 0; zeros if p_clean == p_noise."""
        return tracing_effect(self.p_restore, self.p_clean, self.p_noise)

    def effect_by_layer(self, reduce: str = "max") -> torch.Tensor:
        """[L]: max over the restored tokens (paper default) or at the last subject token."""
        if reduce == "max":
            return self.effect.max(dim=0).values
        if reduce == "last_subject":
            last = self.subject_span[1] - 1
            check(last in self.positions, "the last subject token was not traced; trace with tokens='all' or 'subject_last'")
            return self.effect[self.positions.index(last)]
        raise TracekitError(f"unknown reduce {reduce!r}; use 'max' or 'last_subject'")

    def labels(self) -> list[str]:
        return [f"{self.tokens[t]!r}{'*' if self.is_subject(t) else ''}" for t in self.positions]

    def to_frame(self):
        """Tidy rows (one per restored token x layer) as a pandas DataFrame."""
        import pandas as pd

        effect = self.effect
        rows = []
        for i, t in enumerate(self.positions):
            for layer in range(self.p_restore.shape[1]):
                rows.append({"model": self.model, "prompt": self.prompt, "subject": self.subject,
                             "answer": self.answer, "kind": self.kind, "window": self.config.get("window"),
                             "token_index": t, "token": self.tokens[t], "is_subject": self.is_subject(t),
                             "is_last_subject": t == self.subject_span[1] - 1, "layer": layer,
                             "p_restore": float(self.p_restore[i, layer]), "effect": float(effect[i, layer]),
                             "p_clean": self.p_clean, "p_noise": self.p_noise})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """ROME-style heatmap of p_restore (tokens x layers), subject tokens marked with *, as a
        matplotlib Figure (drawn into ``ax`` when given); ``save(path)`` writes it to a file."""
        title = (f"restoring {self.kind}: p({self.answer!r}) clean {self.p_clean:.3f}, "
                 f"noised {self.p_noise:.3f}\n{self.prompt}")
        vmin = min(self.p_noise, float(self.p_restore.min()))  # ROME's scale: white = the noised run
        return self._heatmap(self.p_restore, self.labels(), title, f"p({self.answer!r})", vmin, ax)

    def caption(self) -> str:
        return (f"{self.prompt!r} -> {self.answer!r}: p_clean {self.p_clean:.4f}, p_noise {self.p_noise:.4f} "
                f"(restoring {self.kind}, window {self.config.get('window')}; * subject)")

    def __rich__(self) -> Group:
        title = (f"{self.prompt!r} -> {self.answer!r}: p_clean {self.p_clean:.4f}, p_noise {self.p_noise:.4f} "
                 f"({self.kind}, window {self.config.get('window')}; effect = fraction restored; * subject)")
        return self._table(title, self.labels(), self.effect)


@dataclass
class ZeroResult(_LayerMap):
    """Representation zeroing: p_zero[layer] with the site zeroed at ``positions`` within the window."""

    positions: list[int] = field(default_factory=list)
    p_zero: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def effect(self) -> torch.Tensor:
        """Fraction of p_clean removed, (p_clean - p_zero) / p_clean clipped to [0, 1]."""
        if self.p_clean == 0:
            return torch.zeros_like(self.p_zero)
        return ((self.p_clean - self.p_zero) / self.p_clean).clamp(0, 1)

    def effect_by_layer(self, reduce: str = "max") -> torch.Tensor:
        return self.effect

    def to_frame(self):
        import pandas as pd

        effect = self.effect
        return pd.DataFrame([{"model": self.model, "prompt": self.prompt, "subject": self.subject,
                              "answer": self.answer, "kind": self.kind, "window": self.config.get("window"),
                              "layer": layer, "p_zero": float(self.p_zero[layer]), "effect": float(effect[layer]),
                              "p_clean": self.p_clean} for layer in range(self.p_zero.shape[0])])

    def _label(self) -> str:
        return "zeroed " + "".join(self.tokens[t] for t in self.positions).strip()

    def plot(self, ax=None):
        """One-row heatmap of the fraction of p_clean removed per layer, as a matplotlib Figure."""
        title = f"zeroing {self.kind} at the subject: p({self.answer!r}) clean {self.p_clean:.3f}\n{self.prompt}"
        return self._heatmap(self.effect[None], [self._label()], title, "fraction of p_clean removed", 0.0, ax)

    def caption(self) -> str:
        return (f"{self.prompt!r} -> {self.answer!r}: p_clean {self.p_clean:.4f}; zeroing {self.kind} "
                f"(window {self.config.get('window')})")

    def __rich__(self) -> Group:
        title = (f"{self.prompt!r} -> {self.answer!r}: p_clean {self.p_clean:.4f}; zeroing {self.kind} "
                 f"(window {self.config.get('window')}; effect = fraction of p_clean removed)")
        return self._table(title, [self._label()], self.effect[None])


def result_from_json(text_or_path):
    """Load a TraceResult or ZeroResult from JSON text or a file."""
    text = str(text_or_path)
    if not text.lstrip().startswith("{"):
        text = Path(text).read_text()
    kind = json.loads(text).get("type")
    return ZeroResult.from_json(text) if kind == "ZeroResult" else TraceResult.from_json(text)


__all__ = ["TraceResult", "ZeroResult", "result_from_json"]
