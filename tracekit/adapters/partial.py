"""The partial forward: run a slice of a model's layers over a slice of its positions.

Design
------
Everything that runs the network can go through one call, ``Model.forward`` (that is,
``Backend.forward``). It takes one of three inputs:

- ``ids`` [B, T]: a pass from the embeddings (rows right-padded; positions 0..T-1);
- ``hidden`` [B, P, d] with ``start_layer``: block ``start_layer``'s input at positions
  0..P-1 (fine-tuning runs the frozen bottom of the model once, then the top with grad);
- ``branch``: rows that re-run the end of an earlier pass kept with ``record=True``. Row i
  copies recorded row ``source[i]`` below its layer ``layer[i]`` and before its position
  ``start[i]``; from there on it is recomputed for ``width`` positions, seeing the recorded
  keys/values of the earlier positions (causal attention: they cannot change). Causal
  tracing restores token t in layers lo..hi-1 with a row (t, lo); v* adds its delta at the
  last subject token above layer l with a row (s, l + 1) and ``hidden`` = state + delta.

and runs blocks ``start_layer .. stop_layer - 1`` with ``edits`` (site -> pure function of
the site's tensor, over the pass's own columns), recording ``capture`` sites, returning
logits where asked (``logits``: columns per row, or "all") and the last block's output.

How a call runs is decided in one place, ``Backend.forward_path``:

- "blocks" (hf backend, sdpa or eager attention; ``tracekit.adapters.blocks``): the HF blocks
  are called one by one, only for the layers and positions asked for; earlier positions'
  keys/values come from the recording through a duck-typed KV cache.
- "whole passes" (TransformerLens, nnsight, other attention implementations; ``whole_pass``
  below): one ordinary forward pass with hooks. Each row is laid out as a full sequence
  (its recorded earlier positions, then its columns), its entering state is written into
  ``Site("resid_pre", layer)``, and edits and captures see only its columns. Every layer
  and position is computed (the work the blocks path skips); the values are the same.

Shapes (blocks path only). ``shapes="exact"`` runs the shapes asked for (the CPU default:
padding would be pure waste there). ``shapes="bucketed"`` (the CUDA default) pads the row
count, the column count and the number of prefix keys up to a fixed grid (``bucket``), so
the shapes a process meets stay few however many prompt lengths it sees; padded rows and
columns are computed and dropped (padding sits after every real position, so causal
attention keeps it out of the real ones). Edits and captures never see padding. On CUDA the
attention kernels are picked explicitly (``attention_kernels``: flash, memory-efficient or
math; never cuDNN's SDPA, which builds an execution plan for every new shape).

``ForwardStats`` counts block calls, rows x positions asked for and computed (padding
included) and the distinct attention shapes, for benchmarks and tests.

Row joins: a branch's rows are sorted by layer, and at layer l a pass holds rows
0..n(l)-1 with n(l) = #(layer[i] <= l); an edit or capture at a site of layer l sees (and
returns) exactly those n(l) rows and ``width`` columns.

Who runs the network through it: causal tracing and zeroing (``tracekit.tracing``: clean
runs, recorded base runs, branches); v* (``editing.kv_batch``: a recording of the edit rows, then
per step a branch from the last subject token at block l + 1 with ``hidden`` = recorded state +
delta, ``grad=True``); key statistics (``editing.covariance.accumulate``: ``stop_layer`` = the
top layer needed); fine-tuning (``editing.finetune``: the frozen bottom once, then the top with
grad); and the edit scores (``editing.logprobs``: the "before" pass keeps every block's input,
the pass after an edit starts at the edit's lowest layer). The naive tracing loop keeps
``Model.run`` on purpose (it is the reference), as does Fact Forcing's noised-prompt baseline
(``editing.problems``, one pass per point). Activation patching composes edits on any site
(``resid_pre`` included).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from tracekit.adapters.architectures import Site
from tracekit.errors import check

HookFn = Callable[[torch.Tensor], torch.Tensor]
PATHS = ("blocks", "whole passes")
SHAPES = ("exact", "bucketed")


# ---- what a pass is given and gives back ---------------------------------------------------
@dataclass(frozen=True)
class Recording:
    """A pass kept for branching: block l's input [S, T, d] for every layer it ran, and on the
    blocks path block l's attention keys/values [S, kv_heads, T, head_dim]."""

    inputs: tuple[torch.Tensor, ...]
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None

    @property
    def n_rows(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def length(self) -> int:
        return self.inputs[0].shape[1]


@dataclass(frozen=True)
class Branch:
    """Rows branching off ``recording`` (see the module doc); build with ``Branch.make``."""

    recording: Recording
    start: torch.Tensor  # [B] first recomputed position
    layer: torch.Tensor  # [B] first recomputed layer, ascending
    source: torch.Tensor  # [B] recorded row each row copies
    width: int  # columns per row: positions start .. start + width - 1

    @classmethod
    def make(cls, recording: Recording, start, layer, source=None, width: int | None = None) -> "Branch":
        start = torch.as_tensor(start, dtype=torch.long).flatten().cpu()
        rows = start.shape[0]
        layer = torch.as_tensor(layer, dtype=torch.long).flatten().cpu().expand(rows).clone()
        source = torch.arange(rows) if source is None else torch.as_tensor(source, dtype=torch.long).flatten().cpu()
        check(rows >= 1 and source.shape[0] == rows, "a branch needs one start, layer and source per row")
        check(bool((layer[1:] >= layer[:-1]).all()), "branch rows must be sorted by layer (ascending)")
        check(int(source.min()) >= 0 and int(source.max()) < recording.n_rows,
              f"branch source rows must lie in 0..{recording.n_rows - 1} (the recording's rows)")
        check(int(start.min()) >= 0 and int(start.max()) < recording.length,
              f"branch starts must lie in 0..{recording.length - 1} (the recording's positions)")
        width = recording.length - int(start.min()) if width is None else int(width)
        check(width >= 1, "a branch needs width >= 1")
        return cls(recording, start, layer, source, width)

    def __len__(self) -> int:
        return self.start.shape[0]

    def entered(self, n_layers: int) -> list[int]:
        """n(l): rows whose layer is <= l, for l = 0..n_layers - 1."""
        return torch.searchsorted(self.layer, torch.arange(n_layers), right=True).tolist()


@dataclass
class Pass:
    """What ``Model.forward`` gives back."""

    logits: torch.Tensor | None  # [B, V] (one column per row), [B, k, V] or [B, P, V] ("all"), or None
    hidden: torch.Tensor  # [B, P, d]: the output of the last block run, at the pass's columns
    captured: dict[Site, torch.Tensor] = field(default_factory=dict)
    recording: Recording | None = None
    path: str = "blocks"


@dataclass
class ForwardStats:
    """Counts over block calls (blocks path): pass one as ``stats=`` to collect them."""

    block_calls: int = 0
    tokens: int = 0  # rows x positions asked for
    computed: int = 0  # rows x positions run, padding included
    attention: Counter = field(default_factory=Counter)  # (rows, queries, keys) -> block calls
    logits: int = 0  # positions unembedded

    def add(self, rows: int, cols: int, keys: int, real: int) -> None:
        self.block_calls += 1
        self.tokens += real
        self.computed += rows * cols
        self.attention[(rows, cols, keys)] += 1

    @property
    def padding(self) -> float:
        """Fraction of computed rows x positions that were padding."""
        return 1 - self.tokens / self.computed if self.computed else 0.0


_COLLECTING: list[ForwardStats] = []


@contextlib.contextmanager
def collect_stats():
    """``with collect_stats() as stats:`` counts every blocks-path call inside (benchmarks, tests)."""
    stats = ForwardStats()
    _COLLECTING.append(stats)
    try:
        yield stats
    finally:
        _COLLECTING.remove(stats)


def collecting() -> ForwardStats | None:
    return _COLLECTING[-1] if _COLLECTING else None


# ---- shapes ---------------------------------------------------------------------------------
def bucket(n: int, steps: int = 4) -> int:
    """The smallest grid value >= n: 1..2*steps, then ``steps`` values per octave (steps=4: 10, 12,
    14, 16, 20, 24, 28, 32, 40, ...), so padding adds at most 1/steps and a range 1..N holds
    about steps * (1 + log2(N / steps)) values."""
    n = max(int(n), 1)
    if n <= 2 * steps:
        return n
    step = 1 << ((n - 1).bit_length() - steps.bit_length())
    return -(-n // step) * step


def bucket_grid(limit: int, steps: int = 4) -> list[int]:
    """Every grid value up to ``bucket(limit, steps)``."""
    out, n = [], 1
    while n <= bucket(limit, steps):
        out.append(n)
        n = bucket(n + 1, steps)
    return out


# Eight grid values per octave: padding adds at most 1/8 (about 6% of a GPT-J study's packed
# passes, against 10% with four), and a few dozen values cover 1..10^4.
ROW_STEPS = COLUMN_STEPS = 8


@dataclass(frozen=True)
class ShapePolicy:
    name: str

    def rows(self, n: int) -> int:
        return n if self.name == "exact" else bucket(n, ROW_STEPS)

    def cols(self, n: int) -> int:
        """Columns and prefix keys."""
        return n if self.name == "exact" else bucket(n, COLUMN_STEPS)

    def key(self, n: int) -> int:
        """What packs rows of width ``n`` together: their column bucket."""
        return bucket(n, COLUMN_STEPS)


def shape_policy(shapes: str | None, device: torch.device) -> ShapePolicy:
    if shapes is None:
        shapes = "bucketed" if device.type == "cuda" else "exact"
    check(shapes in SHAPES, f"unknown shapes {shapes!r}; choose one of {', '.join(SHAPES)}")
    return ShapePolicy(shapes)


def attention_kernels(device: torch.device):
    """On CUDA, let SDPA choose among flash, memory-efficient and math attention only (cuDNN's
    SDPA builds an execution plan per new shape: 13.9 s of 14.9 s on a 15-token GPT-J prompt)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# ---- the request, validated once for both paths ------------------------------------------------
@dataclass
class Request:
    ids: torch.Tensor | None
    hidden: torch.Tensor | None
    branch: Branch | None
    start_layer: int
    stop_layer: int
    edits: dict[Site, HookFn]
    capture: list[Site]
    logits: torch.Tensor | str | None
    record: bool
    grad: bool

    @property
    def n_rows(self) -> int:
        if self.branch is not None:
            return len(self.branch)
        return (self.ids if self.ids is not None else self.hidden).shape[0]

    @property
    def width(self) -> int:
        if self.branch is not None:
            return self.branch.width
        return (self.ids if self.ids is not None else self.hidden).shape[1]

    @property
    def starts(self) -> torch.Tensor:
        return self.branch.start if self.branch is not None else torch.zeros(self.n_rows, dtype=torch.long)

    @property
    def layers(self) -> torch.Tensor:
        if self.branch is not None:
            return self.branch.layer
        return torch.full((self.n_rows,), self.start_layer, dtype=torch.long)

    def active(self, layer: int | None) -> int:
        """Rows a site of ``layer`` holds (None: the embeddings)."""
        if self.branch is None or layer is None:
            return self.n_rows
        return int((self.branch.layer <= layer).sum())


def make_request(n_layers: int, ids=None, hidden=None, branch: Branch | None = None, start_layer: int | None = None,
                 stop_layer: int | None = None, edits: Mapping[Site, HookFn] | None = None, capture: Iterable[Site] = (),
                 logits=None, record: bool = False, grad: bool = False) -> Request:
    check((ids is None) != (hidden is None and branch is None),
          "give a forward pass either ids, or hidden and/or branch")
    stop = n_layers if stop_layer is None else int(stop_layer)
    if ids is not None:
        check(start_layer in (None, 0), "a pass from ids starts at layer 0")
        check(ids.dim() == 2 and ids.shape[0] >= 1 and ids.shape[1] >= 1, "ids must be [rows, positions]")
        start = 0
    elif branch is not None:
        start = int(branch.layer[0])
        check(start_layer in (None, start), f"start_layer {start_layer} != the branch's first layer {start}")
        check(int(branch.layer[-1]) < stop, "every branch row's layer must lie below stop_layer")
        if hidden is not None:
            check(int(branch.layer[-1]) == start, "hidden with a branch needs every row to start at one layer")
            check(tuple(hidden.shape[:2]) == (len(branch), branch.width),
                  f"hidden must be [{len(branch)} rows, {branch.width} columns, d], got {tuple(hidden.shape)}")
    else:
        start = 0 if start_layer is None else int(start_layer)
        check(hidden.dim() == 3, "hidden must be [rows, positions, d_model]")
    check(0 <= start < stop <= n_layers, f"need 0 <= start_layer < stop_layer <= {n_layers}, got {start}, {stop}")
    edits, capture = dict(edits or {}), list(capture)
    for site in [*edits, *capture]:
        if site.kind == "embed":
            check(ids is not None, "Site('embed') can only be edited or captured in a pass from ids")
        else:
            check(start <= site.layer < stop, f"site {site} lies outside the layers run ({start}..{stop - 1})")
    if logits is not None:
        check(stop == n_layers, "logits need the pass to run to the last layer (stop_layer=None)")
        if not isinstance(logits, str):
            logits = torch.as_tensor(logits, dtype=torch.long).cpu()
        check(isinstance(logits, torch.Tensor) or logits == "all", "logits: None, 'all' or column indices per row")
    check(not record or ids is not None, "record=True needs a pass from ids")
    return Request(ids, hidden, branch, start, stop, edits, capture, logits, bool(record), bool(grad))


def apply_to_output(output, fn: HookFn):
    """Sublayer outputs may be tensors or tuples whose first item is the hidden state."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


def first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def gather_columns(values: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """values[rows[i], starts[i] + c] for c < width: [len(rows), width, ...]; positions past the end
    repeat the last one (padding: causal attention keeps it out of every real position)."""
    device = values.device
    cols = (starts.to(device)[:, None] + torch.arange(width, device=device)).clamp(max=values.shape[1] - 1)
    return values[rows.to(device)[:, None], cols]


def pick_logits(request: Request, hidden: torch.Tensor, norm, unembed) -> torch.Tensor | None:
    """Final norm and unembedding at ``request.logits``'s columns of ``hidden`` [B, P, d]."""
    if request.logits is None:
        return None
    if isinstance(request.logits, str):
        return unembed(norm(hidden))
    cols = request.logits.to(hidden.device)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    picked = hidden[rows, cols] if cols.dim() == 1 else hidden[rows[:, None], cols]
    return unembed(norm(picked))


# ---- the whole-pass path ------------------------------------------------------------------------
def whole_pass(backend, request: Request) -> Pass:
    """``request`` through one ordinary forward pass of ``backend`` (``Backend.run``), hooks doing
    the rest: every layer and position is computed, the values returned are the partial pass's."""
    req = request
    rows, width = req.n_rows, req.width
    starts = req.starts
    total = int(starts.max()) + width
    cols = starts[:, None] + torch.arange(width)  # [B, W] absolute positions of each row's columns
    plain = req.branch is None  # rows hold positions 0..P-1 and are all present at every layer
    ids = req.ids if req.ids is not None else torch.zeros(rows, total, dtype=torch.long)

    edits: dict[Site, HookFn] = {}
    if req.ids is None:
        for layer in sorted(set(req.layers.tolist())):
            edits[Site("resid_pre", layer)] = _entry_fn(req, layer, total)
    for site, fn in req.edits.items():
        wrapped = fn if plain else _column_fn(fn, cols[: req.active(site.layer)])
        edits[site] = _compose(edits[site], wrapped) if site in edits else wrapped
    capture = list(req.capture)
    last = Site("resid", req.stop_layer - 1)
    recorded = [Site("resid_pre", layer) for layer in range(req.stop_layer)] if req.record else []
    positions = None
    if isinstance(req.logits, torch.Tensor) and req.logits.dim() == 1:
        positions = starts + req.logits  # one absolute position per row: the backend gathers it
    out = backend.run(ids, edits=edits, capture=[*capture, last, *recorded], positions=positions, grad=req.grad)

    def columns(site: Site, value: torch.Tensor) -> torch.Tensor:
        n = req.active(site.layer)
        return value[:n, :width] if plain else gather_columns(value, torch.arange(n), starts[:n], width)

    logits = out.logits
    if req.logits is None:
        logits = None
    elif isinstance(req.logits, str):
        logits = columns(Site("embed"), logits)
    elif req.logits.dim() == 2:
        at = (starts[:, None] + req.logits).to(logits.device)
        logits = logits[torch.arange(rows, device=logits.device)[:, None], at]
    recording = None
    if req.record:
        recording = Recording(tuple(out.captured[s] for s in recorded), None)
    captured = {site: columns(site, out.captured[site]) for site in capture}
    return Pass(logits, columns(last, out.captured[last]), captured, recording, "whole passes")


def _compose(first: HookFn, second: HookFn) -> HookFn:
    return lambda h: second(first(h))


def _column_fn(fn: HookFn, cols: torch.Tensor) -> HookFn:
    """Apply ``fn`` to rows 0..n-1 at their columns ``cols`` [n, W] of a full-sequence tensor."""
    n = cols.shape[0]

    def edit(full: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(n, device=full.device)[:, None]
        at = cols.to(full.device)
        out = full.clone()
        out[rows, at] = fn(full[rows, at]).to(full.dtype)
        return out

    return edit


def _entry_fn(req: Request, layer: int, total: int) -> HookFn:
    """Write the entering state of the rows whose first layer is ``layer`` into block ``layer``'s
    input: recorded earlier positions, then their columns (``hidden`` or the recording's)."""
    which = torch.nonzero(req.layers == layer).flatten()

    def enter(h: torch.Tensor) -> torch.Tensor:
        device = h.device
        if req.branch is None:  # hidden given at start_layer for positions 0..P-1
            return req.hidden.to(device, h.dtype)
        branch = req.branch
        recorded = branch.recording.inputs[layer]
        state = gather_columns(recorded, branch.source[which], torch.zeros_like(which), total).to(device, h.dtype)
        if req.hidden is not None:  # every row enters here: put the given columns in
            at = branch.start[which].to(device)[:, None] + torch.arange(branch.width, device=device)
            state = state.clone()
            state[torch.arange(len(which), device=device)[:, None], at] = req.hidden.to(device, h.dtype)
        out = h.clone()
        out[which.to(device)] = state
        return out

    return enter
