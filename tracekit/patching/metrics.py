"""Metrics of a patched run, read from the logits at a few positions.

A metric knows which positions' logits it reads (``columns``: the last prompt position, or one
per target token for a teacher-forced multi-token target) and turns those logits [rows, k, vocab]
into one number per row. Built-ins:

- ``"prob"`` / ``"logprob"``: p (log p) of the target, every token teacher-forced: the sequence
  run is prompt + target[:-1] and log p(target) = sum over its tokens; for one token, "prob" is
  the paper's p(o | prompt);
- ``"logit_diff"``: logit(target) - logit(foil) at the last prompt position (first tokens);
- ``"kl"``: KL(clean || patched) of the next-token distribution at the last prompt position;
- any callable ``f(logits [rows, vocab]) -> [rows]`` on the last prompt position's logits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from tracekit import prompts as P
from tracekit.errors import check

METRICS = ("prob", "logprob", "logit_diff", "kl")


def target_tokens(tokenizer, prompt: str, target: str, stacklevel: int = 3) -> list[int]:
    """The target's tokens as scored after ``prompt``; warns when the target does not start at a
    token boundary there (no leading space, or the prompt and target tokenise differently together),
    naming the token that is actually used."""
    ids = P.target_ids(tokenizer, target)
    joint = P.token_ids(tokenizer, prompt + target)
    alone = P.token_ids(tokenizer, prompt)
    spaced = target[:1].isspace() or prompt[-1:].isspace()
    if not spaced or joint != alone + ids:
        used = tokenizer.decode([ids[0]])
        hint = f"; for the word after a space pass {' ' + target.lstrip()!r}" if not spaced else ""
        warnings.warn(f"target {target!r} does not start at a token boundary after the prompt: its first token "
                      f"is scored as {used!r} (id {ids[0]}){hint}", stacklevel=stacklevel)
    return ids


def default_foil(corrupt_logits: torch.Tensor, target_id: int) -> int:
    """The corrupted run's top next token other than the target (logits [S, V], averaged over rows)."""
    mean = corrupt_logits.float().mean(0).clone()
    mean[target_id] = float("-inf")
    return int(mean.argmax())


@dataclass
class Metric:
    """A named metric over logits at ``columns`` (absolute positions of the sequence run)."""

    name: str
    columns: list[int]
    fn: Callable[[torch.Tensor], torch.Tensor]  # logits [rows, k, V] -> [rows]
    info: dict = field(default_factory=dict)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(logits.float()).detach().cpu()


def _logprob(ids: list[int]):
    index = torch.tensor(ids)

    def fn(logits):
        logp = torch.log_softmax(logits, -1)
        return logp[:, torch.arange(len(ids)), index.to(logp.device)].sum(-1)

    return fn


def _prob(ids: list[int]):
    if len(ids) == 1:  # the paper's p(o | prompt), computed as the tracer does
        return lambda logits: torch.softmax(logits[:, 0], -1)[:, ids[0]]
    logprob = _logprob(ids)
    return lambda logits: logprob(logits).exp()


def make_metric(name, model, prompt_length: int, target_ids: list[int] | None, foil_id: int | None = None,
                clean_logits: torch.Tensor | None = None) -> Metric:
    """The metric ``name`` (or a callable) for a prompt of ``prompt_length`` tokens."""
    last = prompt_length - 1
    if callable(name):
        fn = name
        return Metric(getattr(fn, "__name__", "custom"), [last], lambda logits: fn(logits[:, 0]))
    check(name in METRICS, f"unknown metric {name!r}; choose one of {', '.join(METRICS)} or pass a function of logits")
    if name in ("prob", "logprob"):
        n = len(target_ids)
        fn = _prob(target_ids) if name == "prob" else _logprob(target_ids)
        return Metric(name, list(range(last, last + n)), fn, {"target_ids": list(target_ids)})
    if name == "logit_diff":
        check(foil_id is not None, "metric 'logit_diff' needs a foil (the answer to compare with)")
        a, b = target_ids[0], foil_id
        return Metric(name, [last], lambda logits: logits[:, 0, a] - logits[:, 0, b],
                      {"target_id": a, "foil_id": b})
    check(clean_logits is not None, "metric 'kl' needs the clean run's logits")
    ref = torch.log_softmax(clean_logits.float().reshape(-1), -1)

    def kl(logits):
        logp = torch.log_softmax(logits[:, 0], -1)
        r = ref.to(logp.device)
        return (r.exp() * (r - logp)).sum(-1)

    return Metric(name, [last], kl)
