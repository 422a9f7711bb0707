"""Teacher-forced log-probabilities of continuations, with logits only where they are scored.

Used by the edit metrics (one batched pass before and one after an edit). A query is a
prefix of tokens and a continuation: row = prefix + continuation[:-1], and token j of the
continuation is scored at position len(prefix) - 1 + j. The final norm and the unembedding are
applied only at scored positions, never to the whole [batch, pos, vocab] grid.

Subject noise (Fact Forcing): a query may name its subject span; ``token_logprobs`` then noises
those spans with one ``SubjectNoise.eval_plan`` per pass (``tracing.noise.add_subject_noise``).
Identical rows are run once, except under noise drawn afresh per pass, where every row has a
draw of its own (as in the paper's code).

Passes go through the partial forward (``Model.forward``). A "before" pass can keep every
block's input (``token_logprobs_kept`` -> ``BlockInputs``); a pass after an edit whose lowest
changed layer is l then starts at block l from the kept inputs (``start=``), since the blocks
below l compute exactly what they computed before. That skips l of the model's layers for every
scored row (essence texts included) of every edit in a sweep over layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tracekit import prompts as P
from tracekit.adapters import Site
from tracekit.errors import check
from tracekit.tracing.noise import spans_noise_hook


@dataclass(frozen=True)
class Query:
    prefix: tuple[int, ...]
    continuation: tuple[int, ...]
    span: tuple[int, int] | None = None  # subject span to noise (None: scored clean)


def text_query(model, prompt: str, continuation: str, noised_subject: str | None = None) -> Query:
    """Score ``continuation`` (e.g. " English") after ``prompt``; with ``noised_subject``, the
    subject's first occurrence is noised whenever the pass has subject noise."""
    prefix = tuple(P.token_ids(model.tokenizer, prompt))
    span = None if noised_subject is None else model.subject_span(prompt, noised_subject)
    return Query(prefix, tuple(model.target_ids(continuation)), span)


def _rows(queries: Sequence[Query], unique: bool, groups: Sequence[int] | None = None):
    """Token rows, their subject spans, each query's row index and each row's group (rows are
    shared only inside a group)."""
    keys: dict[tuple, int] = {}
    rows, spans, where, row_groups = [], [], [], []
    for i, q in enumerate(queries):
        check(len(q.prefix) > 0 and len(q.continuation) > 0, "a scored query needs a prefix and a continuation")
        group = 0 if groups is None else groups[i]
        key = (q.prefix + q.continuation[:-1], q.span, group)
        if not unique or key not in keys:
            keys[key] = len(rows)
            rows.append(key[0])
            spans.append(q.span)
            row_groups.append(group)
        where.append(keys[key] if unique else len(rows) - 1)
    return rows, spans, where, row_groups


@dataclass(frozen=True)
class BlockInputs:
    """Every block's input for the rows of one pass: rows[(tokens, span)] -> row index,
    inputs[l] = block l's input [rows, T, d] (``token_logprobs_kept``)."""

    rows: dict
    inputs: tuple[torch.Tensor, ...]


def gather_block_inputs(kept: Sequence[BlockInputs], layer: int, keys: Sequence[tuple]) -> torch.Tensor | None:
    """Block ``layer``'s input for the rows ``keys`` ((tokens, span) each), taken from whichever
    ``kept`` pass holds each and padded to the longest; None if a row is in none of them."""
    parts = []
    for key in keys:
        found = next(((k.inputs[layer], k.rows[key]) for k in kept if key in k.rows), None)
        if found is None:
            return None
        parts.append(found)
    length = max(inputs.shape[1] for inputs, _ in parts)
    out = parts[0][0].new_zeros((len(parts), length, parts[0][0].shape[2]))
    for i, (inputs, row) in enumerate(parts):  # zeros after a row's recorded end: causal attention never reads them
        out[i, : inputs.shape[1]] = inputs[row]
    return out


def token_logprobs(model, queries: Sequence[Query], grad: bool = False, noise=None,
                   row_spans: Sequence | None = None, groups: Sequence[int] | None = None,
                   row_edits=None, start: tuple[int, Sequence[BlockInputs]] | None = None) -> list[torch.Tensor]:
    """log p of every continuation token, per query ([n_continuation_tokens] each), in one pass.

    ``noise``: a ``SubjectNoise``; the spans of the queries that name one are noised.
    ``row_spans``: the span to noise in each row instead (rows are the queries, in order, when
    the noise is drawn afresh per pass): the paper code's scorer (``metrics``) needs it.
    ``groups``: each query's group (several edits scored in one pass: ``metrics.evaluate_edits``);
    ``row_edits(row_groups)``: more edits for the pass, given each row's group [rows].
    ``start``: (layer, kept passes): start at block ``layer`` from the block inputs that earlier
    passes over the same rows kept (the caller promises nothing below ``layer`` has changed, the
    noise included); rows found in none of them make it a whole pass."""
    return _score(model, queries, grad, noise, row_spans, groups, row_edits, start, keep=False)[0]


def token_logprobs_kept(model, queries: Sequence[Query], noise=None) -> tuple[list[torch.Tensor], BlockInputs]:
    """``token_logprobs`` that also keeps every block's input for its rows (``start=`` of a later pass)."""
    return _score(model, queries, False, noise, None, None, None, None, keep=True)


def _score(model, queries, grad, noise, row_spans, groups, row_edits, start, keep: bool):
    fresh = noise is not None and noise.fresh_per_pass
    rows, spans, where, row_groups = _rows(queries, unique=not fresh and row_spans is None, groups=groups)
    if row_spans is not None:
        check(len(row_spans) == len(rows), f"{len(row_spans)} row spans for {len(rows)} rows")
        spans = list(row_spans)
    batch = P.pad(rows, model.tokenizer.pad_token_id)
    check(batch.input_ids.shape[1] <= model.n_ctx,
          f"a scored row is {batch.input_ids.shape[1]} tokens, longer than the model's context of {model.n_ctx}")
    entry = None
    if start is not None and start[0] > 0 and start[1]:
        entry = gather_block_inputs(start[1], start[0], list(zip(rows, spans)))
    edits = {}
    if entry is None and noise is not None and any(s is not None for s in spans):
        plan_spans, draws, align = noise.eval_plan(noise.source(model.d_model), spans)
        edits[Site("embed")] = spans_noise_hook(plan_spans, draws, align)
    if row_edits is not None:
        edits.update(row_edits(torch.tensor(row_groups)))
    kept_sites = [Site("resid_pre", layer) for layer in range(model.n_layers)] if keep else []
    if entry is None:
        out = model.forward(batch.input_ids, edits=edits, capture=kept_sites, grad=grad)
    else:
        out = model.forward(hidden=entry[:, : batch.input_ids.shape[1]], start_layer=start[0], edits=edits, grad=grad)
    hidden = out.hidden  # the last block's output at every position

    picks_row, picks_pos, picks_tok, owners = [], [], [], []
    for qi, q in enumerate(queries):
        first = len(q.prefix) - 1
        for j, tok in enumerate(q.continuation):
            picks_row.append(where[qi])
            picks_pos.append(first + j)
            picks_tok.append(tok)
            owners.append(qi)
    device = hidden.device
    rows_t = torch.tensor(picks_row, device=device)
    pos_t = torch.tensor(picks_pos, device=device)
    normed = final_norm(model)(hidden[rows_t, pos_t])
    logits = model.adapter.unembed_module(model.hf)(normed).float()
    picked = torch.log_softmax(logits, dim=-1)[torch.arange(len(picks_tok), device=device),
                                               torch.tensor(picks_tok, device=device)]
    owners_t = torch.tensor(owners)
    scores = [picked[(owners_t == qi).to(device)] for qi in range(len(queries))]
    kept = None
    if keep:
        kept = BlockInputs({key: i for i, key in enumerate(zip(rows, spans))},
                           tuple(out.captured[site] for site in kept_sites))
    return scores, kept


def final_norm(model) -> torch.nn.Module:
    return model.hf.get_submodule(model.adapter.final_norm)
