"""``Model``: a backend (the hookable wrapper), its tokenizer and its architecture adapter."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from tracekit import prompts as P
from tracekit.adapters import ArchAdapter, Backend
from tracekit.errors import check


@dataclass
class Model:
    spec: str
    backend: Backend
    tokenizer: object
    adapter: ArchAdapter

    # ---- shape -----------------------------------------------------------------
    @property
    def hf(self) -> torch.nn.Module:
        """The underlying transformers model: every backend runs these very modules."""
        return self.backend.hf

    @property
    def wrapper(self):
        """The TransformerBridge, nnsight LanguageModel, or HF model itself."""
        return self.backend.wrapper

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.hf)

    @property
    def d_model(self) -> int:
        return self.adapter.d_model(self.hf)

    @property
    def n_ctx(self) -> int:
        return self.adapter.n_ctx(self.hf)

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def __repr__(self) -> str:
        return f"Model({self.spec!r}, backend={self.backend.name}, arch={self.adapter.name}, layers={self.n_layers})"

    # ---- prompts --------------------------------------------------------------------
    def encode(self, prompts: str | Sequence[str]) -> P.Batch:
        return P.encode(self.tokenizer, prompts, max_len=self.n_ctx)

    def subject_span(self, prompt: str, subject: str, occurrence: int | None = None) -> tuple[int, int]:
        return P.subject_span(self.tokenizer, prompt, subject, occurrence)

    def target_ids(self, target: str) -> list[int]:
        return P.target_ids(self.tokenizer, target)

    def tokens(self, prompt: str) -> list[str]:
        return [self.tokenizer.decode([i]) for i in P.token_ids(self.tokenizer, prompt)]

    # ---- forward passes ------------------------------------------------------------------
    def run(self, input_ids, **kwargs):
        return self.backend.run(input_ids, **kwargs)

    def next_token_probs(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """[batch, vocab] next-token distribution after each prompt."""
        batch = self.encode(prompts)
        logits = self.run(batch.input_ids, positions=batch.last).logits
        return torch.softmax(logits.float(), dim=-1)

    def target_probs(self, prompts: Sequence[str], targets: Sequence[str] | str) -> torch.Tensor:
        """p(first token of target | prompt) per prompt, the paper's p(o | prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        targets = [targets] * len(prompts) if isinstance(targets, str) else list(targets)
        check(len(prompts) == len(targets), "give one target per prompt")
        ids = torch.tensor([P.first_target_id(self.tokenizer, t) for t in targets])
        probs = self.next_token_probs(prompts)
        return probs[torch.arange(len(prompts)), ids.to(probs.device)].cpu()

    def sequence_logprobs(self, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        """Sum of log p over every target token (teacher-forced), per prompt."""
        rows, spans = [], []
        for prompt, target in zip(prompts, targets, strict=True):
            p_ids, t_ids = P.token_ids(self.tokenizer, prompt), P.target_ids(self.tokenizer, target)
            rows.append(p_ids + t_ids)
            spans.append((len(p_ids), len(t_ids)))
        batch = P.pad(rows, self.tokenizer.pad_token_id)
        logp = torch.log_softmax(self.run(batch.input_ids).logits.float(), dim=-1).cpu()
        out = []
        for i, (start, n) in enumerate(spans):
            positions = torch.arange(start - 1, start - 1 + n)
            out.append(logp[i, positions, batch.input_ids[i, start:start + n]].sum())
        return torch.stack(out)

    def top_tokens(self, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most likely next tokens after one prompt, with their probabilities."""
        check(isinstance(prompt, str), f"top_tokens takes one prompt (a string), got a {type(prompt).__name__}; "
                                       "call it once per prompt, or use next_token_probs for a batch")
        vocab = self.adapter.unembed_module(self.hf).weight.shape[0]
        check(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= vocab,
              f"k must be an integer from 1 to the vocabulary size {vocab}, got {k!r}")
        probs = self.next_token_probs([prompt])[0]
        values, ids = probs.topk(k)
        return [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 20, batch_size: int = 32,
                 top_k: int | None = None, seed: int = 0) -> list[str]:
        """Continuations (text after each prompt): greedy, or top-k sampling when ``top_k`` is set.

        Runs the underlying HF model's ``generate`` with a KV cache and left padding (the
        only place tracekit pads on the left), in batches of ``batch_size``.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [P.token_ids(self.tokenizer, p) for p in prompts]
        if self.backend.name != "hf":
            # The TransformerLens bridge rewires the HF modules, and HF's cached decoding
            # does not survive that: decode through this backend's own forward instead.
            return self._generate_uncached(rows, max_new_tokens, top_k, seed)
        pad_id = self.tokenizer.pad_token_id
        texts: list[str] = []
        generator_state = torch.random.fork_rng(devices=[]) if top_k else contextlib.nullcontext()
        with generator_state, torch.no_grad():
            if top_k:
                torch.manual_seed(seed)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                width = max(len(r) for r in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, r in enumerate(chunk):
                    ids[i, width - len(r):] = torch.tensor(r)
                    mask[i, width - len(r):] = 1
                out = self.hf.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens, do_sample=bool(top_k), top_k=top_k,
                    pad_token_id=pad_id, eos_token_id=None,
                )
                texts += [self.tokenizer.decode(o[width:]) for o in out.cpu()]
        return texts

    def _generate_uncached(self, rows: list[list[int]], max_new_tokens: int, top_k: int | None, seed: int) -> list[str]:
        gen = torch.Generator().manual_seed(seed)
        new: list[list[int]] = [[] for _ in rows]
        for _ in range(max_new_tokens):
            batch = P.pad([r + n for r, n in zip(rows, new)], self.tokenizer.pad_token_id)
            logits = self.run(batch.input_ids, positions=batch.last).logits.float().cpu()
            if top_k:
                values, ids = logits.topk(top_k, dim=-1)
                picks = ids.gather(-1, torch.multinomial(values.softmax(-1), 1, generator=gen)).squeeze(-1)
            else:
                picks = logits.argmax(-1)
            for n, token in zip(new, picks.tolist()):
                n.append(token)
        return [self.tokenizer.decode(n) for n in new]
