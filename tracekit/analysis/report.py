"""Tables: printed with rich, saved as Markdown and CSV side by side."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table


def format_cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.3f}"
    return str(value)


def to_markdown(df: pd.DataFrame, title: str | None = None) -> str:
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(map(str, df.columns)) + " |")
    lines.append("|" + "|".join(" ---: " if pd.api.types.is_numeric_dtype(df[c]) else " --- " for c in df.columns) + "|")
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(format_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def save_table(df: pd.DataFrame, out_dir: str | Path, name: str, title: str,
               console: Console | None = None) -> list[Path]:
    """Print ``df`` as a rich table and write ``name.md`` and ``name.csv`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if console is not None:
        table = Table(title=title)
        for column in df.columns:
            table.add_column(str(column), justify="right" if pd.api.types.is_numeric_dtype(df[column]) else "left")
        for row in df.itertuples(index=False):
            table.add_row(*(format_cell(v) for v in row))
        console.print(table)
    md, csv = out_dir / f"{name}.md", out_dir / f"{name}.csv"
    md.write_text(to_markdown(df, title))
    df.to_csv(csv, index=False)
    return [md, csv]
