"""Batched activation patching on the partial forward (``Model.forward``), as the tracer runs.

The base run (the corrupted run when denoising, the clean one when noising) is recorded once;
the source run's site values are captured once. A *patch* is one configuration: a site kind,
a window of layers, a set of positions and optionally one head. A *row* is a patch applied to
one base row with one source row (noise samples give several). A row patching positions >= t
from layer lo on is a branch off the recording: it runs blocks lo..L-1 over positions t..T-1
only (layers below and positions before are the base run's; their keys/values come from the
recording). Rows sharing t run together, sorted by lo, cut to ``batch_tokens``; each site of a
layer gets one pure hook writing the source values into every active row's patched columns.
On the whole-passes path (TransformerLens, nnsight) the same request runs as ordinary passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracekit.adapters import Site
from tracekit.adapters.partial import Branch
from tracekit.tracing.engine import default_batch_tokens


@dataclass(frozen=True)
class Patch:
    """One configuration: ``kind`` at layers ``lo..hi-1`` (the window around ``layer``), positions
    ``positions``, one ``head`` or all."""

    kind: str
    layer: int
    lo: int
    hi: int
    positions: tuple[int, ...]
    head: int | None = None


@dataclass
class Rows:
    patch: torch.Tensor  # [R] index into the patch list
    base: torch.Tensor  # [R] recorded base row
    source: torch.Tensor  # [R] source row


def pairings(n_base: int, n_source: int) -> list[tuple[int, int]]:
    """(base row, source row) pairs each patch runs: every noised row against the one other row."""
    if n_base == n_source:
        return [(i, i) for i in range(n_base)]
    if n_source == 1:
        return [(i, 0) for i in range(n_base)]
    assert n_base == 1
    return [(0, j) for j in range(n_source)]


def run_patches(model, patches: list[Patch], recording, source: dict[Site, torch.Tensor], n_base: int,
                n_source: int, columns: list[int], metric, batch_tokens: int | None = None,
                shapes: str | None = None) -> torch.Tensor:
    """Metric values [len(patches), pairs] for every patch against every (base, source) pair."""
    pairs = pairings(n_base, n_source)
    P, K = len(patches), len(pairs)
    rows = Rows(torch.arange(P).repeat_interleave(K), torch.tensor([b for b, _ in pairs]).repeat(P),
                torch.tensor([s for _, s in pairs]).repeat(P))
    start = torch.tensor([min(p.positions) for p in patches])[rows.patch]
    lo = torch.tensor([p.lo for p in patches])[rows.patch]
    length = recording.length
    batch_tokens = batch_tokens or default_batch_tokens(model)
    cols = torch.tensor(columns)
    values = torch.empty(P * K)
    for first in sorted(set(start.tolist())):
        group = torch.nonzero(start == first).flatten()
        group = group[torch.sort(lo[group], stable=True).indices]
        width = length - first
        per_pass = max(1, batch_tokens // width)
        for i in range(0, len(group), per_pass):
            index = group[i:i + per_pass]
            branch = Branch.make(recording, start[index], lo[index], rows.base[index], width)
            edits = _edits(patches, rows, index, first, source, model.n_layers)
            logits = (cols - first)[None].expand(len(index), -1)
            out = model.forward(branch=branch, edits=edits, logits=logits, shapes=shapes)
            values[index] = metric(out.logits)
    return values.view(P, K)


def _edits(patches: list[Patch], rows: Rows, index: torch.Tensor, first: int, source, n_layers: int) -> dict:
    """Per (kind, layer), one hook putting the source values at every active row's positions (and head)."""
    entries: dict[Site, list[tuple[int, int, int, int]]] = {}  # site -> (row in pass, column, source row, head)
    for r, row in enumerate(index.tolist()):
        patch = patches[int(rows.patch[row])]
        src = int(rows.source[row])
        for layer in range(patch.lo, patch.hi):
            for t in patch.positions:
                entries.setdefault(Site(patch.kind, layer), []).append(
                    (r, t - first, src, -1 if patch.head is None else patch.head))
    return {site: _put(source[site], torch.tensor(e), first) for site, e in entries.items()}


def _put(value: torch.Tensor, entries: torch.Tensor, first: int):
    """h with h[row, column(, head)] replaced by value[source row, first + column(, head)]. Pure."""
    r, c, s, head = entries.T
    whole = head < 0

    def edit(h: torch.Tensor) -> torch.Tensor:
        device = h.device
        out = h.clone()
        v = value.to(device, h.dtype)
        if bool(whole.any()):
            w = whole
            out[r[w].to(device), c[w].to(device)] = v[s[w].to(device), (first + c[w]).to(device)]
        if bool((~whole).any()):
            w = ~whole
            rr, cc, ss, hh = (x[w].to(device) for x in (r, c, s, head))
            out[rr, cc, hh] = v[ss, first + cc, hh]
        return out

    return edit
