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

``fast`` -- hf backend only (``tracekit.adapters.blocks.BlockDriver`` drives the HF
blocks). The base run is computed once, keeping each block's input and attention
keys/values. A row restoring token t with window start l0 then runs only blocks
l0..L-1 and only positions t..T-1: layers below l0 and positions before t equal the
base run (causal attention), so their keys/values are handed in as a prefix. Rows that
share t are batched; rows enter the batch at their own first layer (sorted by l0), so
no row computes a layer it does not need. Logits at the last position only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracekit.adapters import Site
from tracekit.adapters.blocks import BlockDriver
from tracekit.errors import TracekitError
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


# ---- fast engine: drive the HF blocks from the first restored layer and token -----------
def fast_unsupported_reason(model) -> str | None:
    if model.backend.name != "hf":
        return f"the {model.backend.name} backend runs whole forward passes"
    return BlockDriver(model.hf, model.adapter).unsupported_reason()


@dataclass
class BaseRun:
    inputs: list[torch.Tensor]  # per layer: block input [S, T, d]
    keys: list[torch.Tensor]  # per layer: [S, kv_heads, T, head_dim]
    values: list[torch.Tensor]
    p_answer: torch.Tensor  # [S]


def base_run(driver: BlockDriver, job: Job) -> BaseRun:
    ids = job.input_ids.expand(job.n_base, -1)
    edits = {} if job.noise is None else {Site("embed"): subject_noise_hook(job.noise, job.noise_start)}
    hidden = driver.block0_input(ids, edits)
    pos = driver.positions(0, ids.shape[1], hidden)
    inputs, keys, values = [], [], []
    for layer in range(len(driver.blocks)):
        inputs.append(hidden)
        hidden, cache = driver.block(layer, hidden, pos)
        keys.append(cache.seen[0])
        values.append(cache.seen[1])
    return BaseRun(inputs, keys, values, _answer_probs(driver.last_logits(hidden), job.answer_id))


def run_fast(model, job: Job, batch_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same numbers as ``run_generic``, computing only layers >= lo and positions >= first edit."""
    reason = fast_unsupported_reason(model)
    if reason is not None:
        raise TracekitError(f"the fast tracing engine cannot run this model: {reason}; use engine='generic'")
    batch_tokens = batch_tokens or default_batch_tokens(model)
    driver = BlockDriver(model.hf, model.adapter)
    with torch.no_grad():
        base = base_run(driver, job)
        T = job.input_ids.shape[1]
        probs = torch.empty(len(job.rows))
        first = job.rows.first
        for start in sorted(set(first.tolist())):
            group = torch.nonzero(first == start).flatten()
            if start >= T:  # rows that edit nothing equal the base run
                probs[group] = base.p_answer[job.rows.sample[group]]
                continue
            group = group[torch.sort(job.rows.lo[group], stable=True).indices]
            per_pass = max(1, batch_tokens // (T - start))
            for i in range(0, len(group), per_pass):
                index = group[i:i + per_pass]
                probs[index] = _fast_pass(driver, job, base, job.rows.select(index), start)
    return probs, base.p_answer


def _fast_pass(driver: BlockDriver, job: Job, base: BaseRun, rows: Rows, start: int) -> torch.Tensor:
    """Rows sorted by ``lo`` that all first edit position ``start``."""
    device = base.inputs[0].device
    sample = rows.sample.to(device)
    pos = driver.positions(start, job.input_ids.shape[1], base.inputs[0])
    entered = torch.searchsorted(rows.lo, torch.arange(len(driver.blocks) + 1), right=True).tolist()
    hidden = None
    for layer in range(int(rows.lo[0]), len(driver.blocks)):
        n = entered[layer]
        have = 0 if hidden is None else hidden.shape[0]
        if n > have:  # rows whose window starts here join with the base run's state
            joining = base.inputs[layer][sample[have:n], start:]
            hidden = joining if hidden is None else torch.cat([hidden, joining])
        prefix = None
        if start > 0:
            prefix = (base.keys[layer][sample[:n], :, :start], base.values[layer][sample[:n], :, :start])
        with driver.hooks(_layer_edits(job, rows.select(slice(0, n)), layer, from_pos=start)):
            hidden, _ = driver.block(layer, hidden, pos, prefix)
    return _answer_probs(driver.last_logits(hidden), job.answer_id)
