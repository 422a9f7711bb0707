"""Teacher-forced log-probabilities of continuations, with logits only where they are scored.

Used by fine-tuning (the loss, with gradients) and by the edit metrics (one batched pass
before and one after an edit). A query is a prefix of tokens and a continuation: row =
prefix + continuation[:-1], and token j of the continuation is scored at position
len(prefix) - 1 + j. Identical rows are run once. The final norm and the unembedding are
applied only at scored positions, never to the whole [batch, pos, vocab] grid.

Fact Forcing: a query may carry subject noise, added to the token embeddings of its
subject span through a ``Site("embed")`` hook, so the same code scores noised and clean
prompts in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tracekit import prompts as P
from tracekit.adapters import Site
from tracekit.errors import check


@dataclass(frozen=True)
class Query:
    prefix: tuple[int, ...]
    continuation: tuple[int, ...]
    noise_start: int | None = None  # first subject token, where ``noise`` is added
    noise: torch.Tensor | None = None  # [n_subject_tokens, d_model], already scaled


def text_query(model, prompt: str, continuation: str, subject: str | None = None,
               noise: torch.Tensor | None = None) -> Query:
    """Score ``continuation`` (e.g. " English") after ``prompt``; noise the subject if given."""
    prefix = tuple(P.token_ids(model.tokenizer, prompt))
    cont = tuple(model.target_ids(continuation))
    start = None
    if noise is not None:
        check(subject is not None, "subject noise needs the subject")
        start, end = model.subject_span(prompt, subject)
        check(end - start <= noise.shape[0],
              f"the subject {subject!r} is {end - start} tokens in {prompt!r} but the noise covers only "
              f"{noise.shape[0]}; draw it with problems.subject_noise(..., also=[this prompt])")
        noise = noise[noise.shape[0] - (end - start):]  # rows aligned to the subject's end, as in kv_core
    return Query(prefix, cont, start, noise)


def _rows(queries: Sequence[Query]):
    """Unique token rows, and for each query its row index and noise key."""
    keys: dict[tuple, int] = {}
    rows, noises, where = [], [], []
    for q in queries:
        check(len(q.prefix) > 0 and len(q.continuation) > 0, "a scored query needs a prefix and a continuation")
        tokens = q.prefix + q.continuation[:-1]
        noise_key = None if q.noise is None else (q.noise_start, q.noise.data_ptr(), q.noise.shape[0])
        key = (tokens, noise_key)
        if key not in keys:
            keys[key] = len(rows)
            rows.append(tokens)
            noises.append(None if q.noise is None else (q.noise_start, q.noise))
        where.append(keys[key])
    return rows, noises, where


def _embedding_noise(noises, shape, device, dtype):
    """A [batch, pos, d] tensor holding each row's subject noise, zeros elsewhere."""
    if all(n is None for n in noises):
        return None
    bump = torch.zeros(shape, device=device, dtype=dtype)
    for row, item in enumerate(noises):
        if item is not None:
            start, noise = item
            bump[row, start:start + noise.shape[0]] = noise.to(device=device, dtype=dtype)
    return bump


def token_logprobs(model, queries: Sequence[Query], grad: bool = False) -> list[torch.Tensor]:
    """log p of every continuation token, per query ([n_continuation_tokens] each), in one pass."""
    rows, noises, where = _rows(queries)
    batch = P.pad(rows, model.tokenizer.pad_token_id)
    check(batch.input_ids.shape[1] <= model.n_ctx,
          f"a scored row is {batch.input_ids.shape[1]} tokens, longer than the model's context of {model.n_ctx}")
    last_block = Site("resid", model.n_layers - 1)
    edits = {}
    bump = _embedding_noise(noises, (*batch.input_ids.shape, model.d_model), model.device, _dtype(model))
    if bump is not None:
        edits[Site("embed")] = lambda hidden: hidden + bump.to(hidden.dtype)
    # Logits at one position per row are cheap; the scored positions come from the last block.
    out = model.run(batch.input_ids, edits=edits, capture=[last_block], positions=batch.last, grad=grad)
    hidden = out.captured[last_block]

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
    return [picked[(owners_t == qi).to(device)] for qi in range(len(queries))]


def first_token_probs(model, queries: Sequence[Query]) -> torch.Tensor:
    """p(first continuation token) per query: the paper's p(o | prompt)."""
    return torch.stack([lp[0].exp() for lp in token_logprobs(model, queries)]).cpu()


def final_norm(model) -> torch.nn.Module:
    return model.hf.get_submodule(model.adapter.final_norm)


def _dtype(model) -> torch.dtype:
    return next(model.hf.parameters()).dtype
