"""Batched noise-and-restore kernels: many restorations per forward pass.

A *row* is one forward pass worth of work in the naive loop: start from a base run
(the corrupted run under noise sample ``s``, or the clean run for zeroing), and at
layers ``lo..hi-1`` replace the traced site (``mlp``/``attn``/``resid`` output) at the
positions in ``edit_pos`` by its clean value (restoring) or by zero (zeroing). Every
row needs only p(answer) at the last position.

Two engines compute the same numbers (tests hold them to 1e-5 of the naive loop):

``generic`` -- through ``Backend.run``, so it works on every backend (hf,
transformer_lens, nnsight). Rows are packed into a few large passes; the noise and the
per-layer restore masks are small hook functions (``where(mask, clean, h)``).
Savings: one pass per chunk of rows instead of one per (token, layer); no clean row per
pass; on hf, logits at the last position only (TransformerLens and nnsight compute all
positions' logits inside the wrapper and we gather the last one).

``fast`` -- through the partial forward (``Model.forward``, design in
``tracekit.adapters.partial``), so on every backend; what it saves depends on the
model's forward path. The base runs (one per noise sample) are recorded once. A row
restoring token t with window start l0 is a *branch* off its base run: it runs only
blocks l0..L-1 and only positions t..T-1, since layers below l0 and positions before t
equal the base run (causal attention) and their keys/values come from the recording.
Rows enter a pass at their own first layer (sorted by l0), so no row computes a layer it
does not need; logits at the last position only. On the "whole passes" path (TransformerLens,
nnsight) each pass is one ordinary forward with hooks, as ``generic``.

How rows are grouped into passes follows the shape policy (``tracekit.adapters.partial``):
- ``exact`` (CPU default): one base run per prompt; a pass holds rows of one prompt that
  share t (all of width T - t), so nothing is padded;
- ``bucketed`` (CUDA default) with packing: the prompts given together (``run_jobs``, from
  ``trace_many``) share one base run, right-padded to a common length; a pass holds the
  rows of every prompt and start position whose width T - t falls in one bucket, padded to
  it, so passes are large and the shapes few. Padding never changes a number: it sits after
  each row's last real position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracekit.adapters import Site
from tracekit.adapters.partial import Branch, ForwardStats, ShapePolicy, shape_policy
from tracekit.interventions import restore, zero
from tracekit.tracing.noise import subject_noise_hook

CPU_BUDGET_BYTES = 256 << 20


@dataclass
class Rows:
    sample: torch.Tensor  # [R] base-run row each row starts from (noise sample index)
    lo: torch.Tensor  # [R] first edited layer
    hi: torch.Tensor  # [R] one past the last edited layer
    edit_pos: torch.Tensor  # [R, T] bool: positions edited

    def __len__(self) -> int:
        return self.sample.shape[0]

    @property
    def first(self) -> torch.Tensor:
        """First edited position per row (rows with no edit: the prompt length)."""
        T = self.edit_pos.shape[1]
        idx = torch.arange(T).expand_as(self.edit_pos)
        return torch.where(self.edit_pos, idx, T).min(dim=1).values

    def select(self, index: torch.Tensor) -> "Rows":
        return Rows(self.sample[index], self.lo[index], self.hi[index], self.edit_pos[index])


@dataclass
class Job:
    """One prompt's rows and what they start from."""

    input_ids: torch.Tensor  # [1, T]
    answer_id: int
    kind: str
    rows: Rows
    clean: list[torch.Tensor] | None  # clean site values per layer [1, T, d]; None = zero instead
    noise: torch.Tensor | None  # [S, n, d] scaled noise; None = clean base run (S = 1)
    noise_start: int = 0

    @property
    def n_base(self) -> int:
        return 1 if self.noise is None else self.noise.shape[0]


def _edit_fn(value: torch.Tensor | None, mask: torch.Tensor):
    if value is None:
        return lambda h: zero(h, mask.to(h.device))
    return lambda h: restore(h, value, mask.to(h.device))


def _layer_edits(job: Job, rows: Rows, layer: int, from_pos: int = 0) -> dict:
    active = (rows.lo <= layer) & (layer < rows.hi)
    if not bool(active.any()):
        return {}
    mask = rows.edit_pos[:, from_pos:] & active[:, None]
    value = None if job.clean is None else job.clean[layer][:, from_pos:]
    return {Site(job.kind, layer): _edit_fn(value, mask)}


def _answer_probs(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)[:, answer_id].cpu()


def bytes_per_token(model, full_logits: bool = False) -> int:
    """Rough activation bytes one (row, position) keeps alive inside a block."""
    d_mlp = model.adapter.as_out_in(model.adapter.down_proj_weight(model.hf, 0)).shape[1]
    size = next(model.hf.parameters()).element_size()
    per = size * (8 * model.d_model + 3 * d_mlp)
    if full_logits:
        per += 4 * model.hf.config.vocab_size
    return per


def default_batch_tokens(model, full_logits: bool = False) -> int:
    """(row x position) tokens per pass from a memory budget: 256 MiB on CPU, a quarter of free GPU memory."""
    budget = CPU_BUDGET_BYTES
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        budget = free // 4
    return max(1, budget // bytes_per_token(model, full_logits))


# ---- generic engine: whole forward passes through Backend.run --------------------------
def run_generic(model, job: Job, batch_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """p(answer) per row [R] and per base-run row [S], any backend."""
    full_logits = model.backend.name != "hf"
    batch_tokens = batch_tokens or default_batch_tokens(model, full_logits)
    T = job.input_ids.shape[1]
    base = Rows(torch.arange(job.n_base), torch.zeros(job.n_base, dtype=torch.long),
                torch.zeros(job.n_base, dtype=torch.long), torch.zeros(job.n_base, T, dtype=torch.bool))
    out = []
    for rows in (base, job.rows):
        per_pass = max(1, batch_tokens // T)
        probs = [_generic_pass(model, job, rows.select(slice(i, i + per_pass))) for i in range(0, len(rows), per_pass)]
        out.append(torch.cat(probs) if probs else torch.zeros(0))
    return out[1], out[0]


def _generic_pass(model, job: Job, rows: Rows) -> torch.Tensor:
    n, T = len(rows), job.input_ids.shape[1]
    edits = {}
    if job.noise is not None:
        edits[Site("embed")] = subject_noise_hook(job.noise[rows.sample], job.noise_start)
    for layer in range(model.n_layers):
        edits.update(_layer_edits(job, rows, layer))
    logits = model.run(job.input_ids.expand(n, T), edits=edits, positions=torch.full((n,), T - 1)).logits
    return _answer_probs(logits, job.answer_id)


# ---- fast engine: branches off recorded base runs, through the partial forward -----------
def run_fast(model, job: Job, batch_tokens: int | None = None, shapes: str | None = None,
             stats: ForwardStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same numbers as ``run_generic``, computing only layers >= lo and positions >= first edit."""
    return run_jobs(model, [job], batch_tokens=batch_tokens, shapes=shapes, stats=stats)[0]


def run_jobs(model, jobs: list[Job], *, batch_tokens: int | None = None, shapes: str | None = None,
             pack: bool | None = None, stats: ForwardStats | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(p_rows [R], p_base [S]) per job. ``pack`` (default: with bucketed shapes on the blocks path;
    whole passes would compute every row's full length) records the jobs' base runs in one pass
    and mixes their rows and start positions in passes by width bucket."""
    policy = shape_policy(shapes, model.device)
    if pack is None:
        pack = policy.name == "bucketed" and model.forward_path == "blocks"
    groups = [jobs] if pack else [[job] for job in jobs]
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for group in groups:
            out += _run_group(model, group, batch_tokens, policy, pack, stats)
    return out


@dataclass
class _Flat:
    """Every row of a group of jobs, numbered across jobs."""

    source: torch.Tensor  # [R] row of the shared base recording
    start: torch.Tensor  # [R] first edited position
    lo: torch.Tensor
    hi: torch.Tensor
    edit_pos: torch.Tensor  # [R, T] (T = the recording's length)
    job: torch.Tensor  # [R] job index in the group
    length: torch.Tensor  # [R] the job's prompt length
    answer: torch.Tensor  # [R]


def _run_group(model, jobs: list[Job], batch_tokens: int | None, policy: ShapePolicy, pack: bool, stats):
    length = max(job.input_ids.shape[1] for job in jobs)
    base_rows = torch.tensor([job.n_base for job in jobs])
    offsets = torch.cumsum(base_rows, 0) - base_rows
    ids = torch.cat([pad_ids(job.input_ids.expand(job.n_base, -1), length) for job in jobs])
    lengths = torch.cat([torch.full((job.n_base,), job.input_ids.shape[1]) for job in jobs])
    answers = torch.cat([torch.full((job.n_base,), job.answer_id) for job in jobs])
    edits = _base_noise(jobs, length)
    base = model.forward(ids, edits=edits, record=True, logits=lengths - 1, shapes=policy.name, stats=stats)
    p_base = _answer_probs_per_row(base.logits, answers)
    batch_tokens = batch_tokens or default_batch_tokens(model)  # from the memory the recording left
    flat = _flatten(jobs, offsets, length)
    probs = torch.empty(len(flat.source))
    done = flat.start >= flat.length  # rows that edit nothing equal their base run
    probs[done] = p_base[flat.source[done]]
    clean = _clean_stack(jobs, length, model.n_layers)
    for index, width in _passes(flat, ~done, policy, pack, batch_tokens):
        branch = Branch.make(base.recording, flat.start[index], flat.lo[index], flat.source[index], width)
        run = model.forward(branch=branch, edits=_restore_edits(jobs[0].kind, flat, index, width, clean, model),
                            logits=flat.length[index] - 1 - flat.start[index], shapes=policy.name, stats=stats)
        probs[index] = _answer_probs_per_row(run.logits, flat.answer[index])
    out = []
    row = 0
    for i, job in enumerate(jobs):
        n = len(job.rows)
        out.append((probs[row:row + n], p_base[offsets[i]:offsets[i] + job.n_base]))
        row += n
    return out


def pad_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad with token 0: causal attention keeps padding out of every real position."""
    return torch.nn.functional.pad(ids, (0, length - ids.shape[1]))


def _base_noise(jobs: list[Job], length: int) -> dict:
    if all(job.noise is None for job in jobs):
        return {}
    if len(jobs) == 1:
        return {Site("embed"): subject_noise_hook(jobs[0].noise, jobs[0].noise_start)}
    d = next(job.noise.shape[-1] for job in jobs if job.noise is not None)
    bump = torch.zeros(sum(job.n_base for job in jobs), length, d)
    row = 0
    for job in jobs:
        if job.noise is not None:
            n = job.noise.shape[1]
            bump[row:row + job.n_base, job.noise_start:job.noise_start + n] = job.noise
        row += job.n_base
    return {Site("embed"): lambda h: h + bump.to(h.device, h.dtype)}


def _flatten(jobs: list[Job], offsets: torch.Tensor, length: int) -> _Flat:
    parts = []
    for i, job in enumerate(jobs):
        rows, n = job.rows, len(job.rows)
        edit_pos = torch.nn.functional.pad(rows.edit_pos, (0, length - rows.edit_pos.shape[1]))
        parts.append((offsets[i] + rows.sample, rows.first, rows.lo, rows.hi, edit_pos, torch.full((n,), i),
                      torch.full((n,), job.input_ids.shape[1]), torch.full((n,), job.answer_id)))
    return _Flat(*(torch.cat(column) for column in zip(*parts)))


def _clean_stack(jobs: list[Job], length: int, n_layers: int) -> list[torch.Tensor] | None:
    """Per layer, the clean site values of every job [J, T, d] (None when zeroing)."""
    if jobs[0].clean is None:
        return None
    if len(jobs) == 1:
        return jobs[0].clean
    return [torch.cat([torch.nn.functional.pad(job.clean[layer], (0, 0, 0, length - job.clean[layer].shape[1]))
                       for job in jobs]) for layer in range(n_layers)]


def _passes(flat: _Flat, todo: torch.Tensor, policy: ShapePolicy, pack: bool, batch_tokens: int):
    """(row indices sorted by lo, width) per pass: rows grouped by (job, start), or with ``pack``
    by the bucket of their width, then cut to ``batch_tokens`` rows x columns (plus a quarter
    of a column per prefix key: the recorded keys/values each row gathers)."""
    width = flat.length - flat.start
    if pack:
        buckets = {w: policy.key(w) for w in set(width.tolist())}
        key = torch.tensor([buckets[w] for w in width.tolist()])
    else:
        key = flat.job * (int(flat.length.max()) + 1) + flat.start
    for value in sorted(set(key[todo].tolist())):
        group = torch.nonzero(todo & (key == value)).flatten()
        group = group[torch.sort(flat.lo[group], stable=True).indices]
        cols = policy.cols(int(width[group].max()))
        cost = cols + (policy.cols(int(flat.start[group].max())) // 4 if pack else 0)
        per_pass = max(1, batch_tokens // cost)
        for i in range(0, len(group), per_pass):
            index = group[i:i + per_pass]
            index = index[torch.sort(flat.lo[index], stable=True).indices]
            yield index, int(width[index].max())


def _restore_edits(kind: str, flat: _Flat, index: torch.Tensor, width: int, clean, model) -> dict:
    """Per layer, a hook putting the clean value (or zero) at each active row's edited columns.

    The partial forward hands a site of layer l the rows whose window starts at or below l
    (rows 0..n(l)-1 of this pass, sorted by lo); of those, rows with l < hi are edited."""
    start = flat.start[index]
    cols = torch.arange(width)
    at = (start[:, None] + cols).clamp(max=flat.edit_pos.shape[1] - 1)
    mask = flat.edit_pos[index[:, None], at] & (start[:, None] + cols < flat.length[index][:, None])
    rows, columns = torch.nonzero(mask, as_tuple=True)
    positions, jobs = start[rows] + columns, flat.job[index][rows]
    lo, hi = flat.lo[index][rows], flat.hi[index][rows]
    edits = {}
    for layer in range(int(flat.lo[index].min()), model.n_layers):
        pick = (lo <= layer) & (layer < hi)
        if bool(pick.any()):
            value = None if clean is None else clean[layer]
            edits[Site(kind, layer)] = _put(value, rows[pick], columns[pick], jobs[pick], positions[pick])
    return edits


def _put(value: torch.Tensor | None, rows, columns, jobs, positions):
    """h with h[rows, columns] replaced by value[jobs, positions] (or zero). Pure."""
    def edit(h: torch.Tensor) -> torch.Tensor:
        device = h.device
        r, c = rows.to(device), columns.to(device)
        out = h.clone()
        if value is None:
            out[r, c] = 0
        else:
            out[r, c] = value[jobs.to(value.device), positions.to(value.device)].to(device, h.dtype)
        return out

    return edit


def _answer_probs_per_row(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    return probs[torch.arange(len(answers), device=probs.device), answers.to(probs.device)].cpu()
