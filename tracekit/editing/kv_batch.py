"""v* for several requests at one layer, all their rows in every pass.

``BatchedObjective`` is ``kv_core.ValueObjective``'s blocks engine over the rows of k requests
at once: one recorded pass of every request's rows (right-padded to a common length), then per
Adam step one branch of the recording holding every still-active request's rows, each entering
block ``layer + 1`` with its recorded state + its own request's delta. Rows never attend to each
other, so request r's loss depends on its delta alone and ``kv_core.optimize_values`` gives each
request exactly its single-request schedule (its own Adam, early stop, final pass): the deltas
equal k single optimisations up to floating-point reassociation (tests: <= 1e-5).

Requests whose subject noise is drawn afresh per pass (the paper code's Fact Forcing) cannot
reuse a recording: ``WholePassObjective`` runs their rows in one whole pass per step instead,
each request's noise drawn from its own stream for its own rows, so each stream sees exactly the
draws it would alone (``ValueObjective``'s hooks engine is the one-request case).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from tracekit.adapters import Site
from tracekit.editing.kv_core import (EditRows, NoisePasses, SubjectValues, ValueResult, _unembed, optimize_values,
                                      value_terms)
from tracekit.errors import check


class _Requests:
    """What both objectives hold: k requests' rows end to end, their noise, weights and KL baselines."""

    def __init__(self, model, rows: Sequence[EditRows], layer: int,
                 template_weights: Sequence[torch.Tensor | None] | None = None,
                 noises: Sequence[NoisePasses] | None = None):
        check(len(rows) >= 1, "no requests to optimise")
        self.model, self.rows, self.layer = model, list(rows), layer
        self.size, self.device, self.d_model = len(self.rows), model.device, model.d_model
        self.template_weights = list(template_weights) if template_weights is not None else [None] * self.size
        self.noises = list(noises) if noises is not None else [NoisePasses(r, model.d_model) for r in self.rows]
        self.offsets = [0]
        for r in self.rows:
            self.offsets.append(self.offsets[-1] + r.input_ids.shape[0])
        self.kl_init: list[torch.Tensor | None] = [None] * self.size

    def slice(self, r: int) -> slice:
        return slice(self.offsets[r], self.offsets[r + 1])

    def suspended(self):
        from contextlib import ExitStack

        stack = ExitStack()
        for noise in self.noises:
            stack.enter_context(noise.suspended())
        return stack


class BatchedObjective(_Requests):
    """NLL and KL of k requests' rows as functions of their k deltas at block ``layer``."""

    def __init__(self, model, rows: Sequence[EditRows], layer: int,
                 template_weights: Sequence[torch.Tensor | None] | None = None,
                 noises: Sequence[NoisePasses] | None = None):
        super().__init__(model, rows, layer, template_weights, noises)
        check(not any(n.fresh for n in self.noises),
              "batched v* needs noise fixed across passes; run requests with fresh noise one by one")
        self.engine = "blocks" if model.forward_path == "blocks" else "hooks"
        self._record()

    # -- the recording --------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self) -> None:
        from tracekit.adapters.partial import gather_columns

        rows, layer = self.rows, self.layer
        pad = self.model.tokenizer.pad_token_id
        length = max(r.input_ids.shape[1] for r in rows)
        ids = torch.cat([torch.nn.functional.pad(r.input_ids, (0, length - r.input_ids.shape[1]), value=pad)
                         for r in rows])
        self.starts = torch.cat([r.subject_last for r in rows])
        m = max(r.target_pos.shape[1] for r in rows)
        cols = torch.zeros(ids.shape[0], m, dtype=torch.long)
        for r, er in enumerate(rows):
            own = er.target_pos - er.subject_last[: er.n_templates, None]
            at = self.offsets[r]
            # a shorter target repeats its last column (scored once, ignored after)
            cols[at: at + er.n_templates] = torch.cat([own, own[:, -1:].expand(-1, m - own.shape[1])], dim=1)
        self.cols = cols
        sites = [Site("mlp_in", layer), Site("mlp", layer), Site("resid", layer)]
        out = self.model.forward(ids, edits=self._noise_edits(), capture=sites,
                                 record=layer + 1 < self.model.n_layers)
        self.initials = []
        for r, er in enumerate(rows):
            index = torch.arange(er.n_templates) + self.offsets[r]
            at = er.subject_last[: er.n_templates]
            self.initials.append(SubjectValues(*(out.captured[s][index.to(out.captured[s].device),
                                                                 at.to(out.captured[s].device)].float() for s in sites)))
        self.width = int(cols.max()) + 1
        every = torch.arange(ids.shape[0])
        self.entry = gather_columns(out.captured[Site("resid", layer)], every, self.starts, self.width)
        self.recording = out.recording

    def _noise_edits(self) -> dict:
        """Each request's (fixed) subject noise on its own rows of the recorded pass."""
        hooks = []
        for r, noise in enumerate(self.noises):
            fn = noise.edits(range(self.rows[r].input_ids.shape[0])).get(Site("embed"))
            hooks.append(fn)
        if not any(fn is not None for fn in hooks):
            return {}

        def embed(h: torch.Tensor) -> torch.Tensor:
            parts = [h[self.slice(r)] if fn is None else fn(h[self.slice(r)]) for r, fn in enumerate(hooks)]
            return torch.cat(parts)

        return {Site("embed"): embed}

    # -- the objective -----------------------------------------------------------------------------
    def initial(self, r: int) -> SubjectValues:
        return self.initials[r]

    def _branch(self, active: tuple[int, ...]):
        """The rows of the ``active`` requests and their branch off the recording (kept while the set holds)."""
        from tracekit.adapters.partial import Branch

        if getattr(self, "_active", None) != active:
            index = torch.cat([torch.arange(self.offsets[r], self.offsets[r + 1]) for r in active])
            branch = None if self.recording is None else Branch.make(self.recording, self.starts[index], self.layer + 1,
                                                                     source=index, width=self.width)
            self._active, self._rows_branch = active, (index, branch)
        return self._rows_branch

    def losses(self, deltas: Sequence[torch.Tensor], active: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(nll, kl)] of each request in ``active`` from one pass over their rows."""
        index, branch = self._branch(tuple(active))
        x = self.entry[index.to(self.entry.device)].clone()
        bump = torch.cat([deltas[r].to(x.device, x.dtype)[None].expand(self.offsets[r + 1] - self.offsets[r], -1)
                          for r in active])
        x[:, 0] = x[:, 0] + bump
        cols = self.cols[index]
        if self.recording is None:  # the last layer: straight to the final norm and unembedding
            logits = _unembed(self.model, x[torch.arange(x.shape[0], device=x.device)[:, None], cols.to(x.device)])
        else:
            logits = self.model.forward(branch=branch, hidden=x, logits=cols, grad=torch.is_grad_enabled()).logits
        out, at = [], 0
        for r in active:
            er = self.rows[r]
            count = er.input_ids.shape[0]
            own = logits[at: at + count]
            at += count
            out.append(self._loss(r, own[: er.n_templates, : er.target_pos.shape[1]],
                                  own[er.n_templates, 0] if er.has_kl else None))
        return out

    def _loss(self, r: int, logits: torch.Tensor, kl_logits: torch.Tensor | None):
        nll, kl, self.kl_init[r] = value_terms(self.rows[r], logits, kl_logits, self.template_weights[r], self.kl_init[r])
        return nll, kl


class WholePassObjective(_Requests):
    """NLL and KL of k requests' rows, one whole pass per step, the delta added at ``Site("mlp",
    layer)`` on each row's last subject token; for subject noise drawn afresh per pass."""

    engine = "hooks"

    def __init__(self, model, rows: Sequence[EditRows], layer: int,
                 template_weights: Sequence[torch.Tensor | None] | None = None,
                 noises: Sequence[NoisePasses] | None = None):
        super().__init__(model, rows, layer, template_weights, noises)
        pad = model.tokenizer.pad_token_id
        width = max(r.input_ids.shape[1] for r in self.rows)
        self.ids = torch.cat([torch.nn.functional.pad(r.input_ids, (0, width - r.input_ids.shape[1]), value=pad)
                              for r in self.rows])
        self.last = torch.cat([r.subject_last for r in self.rows])
        m = max(r.target_pos.shape[1] for r in self.rows)
        cols = self.last[:, None].repeat(1, m)  # the KL row reads its subject_last (``_hooks_logits``)
        for r, er in enumerate(self.rows):
            own = er.target_pos  # a shorter target repeats its last column (scored once, ignored after)
            cols[self.offsets[r]: self.offsets[r] + er.n_templates] = torch.cat(
                [own, own[:, -1:].expand(-1, m - own.shape[1])], dim=1)
        self.cols = cols
        self.initials: list[SubjectValues | None] = [None] * self.size

    def initial(self, r: int) -> SubjectValues:
        return self.initials[r]

    def losses(self, deltas: Sequence[torch.Tensor], active: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        index = torch.cat([torch.arange(self.offsets[r], self.offsets[r + 1]) for r in active])
        spans, at = [], 0
        for r in active:  # each request's draw for its own rows, from its own stream
            count = self.offsets[r + 1] - self.offsets[r]
            spans.append((slice(at, at + count), self.noises[r].edits(range(count)).get(Site("embed"))))
            at += count
        last = self.last[index]
        bump_rows = torch.arange(len(index))

        def embed(h):
            return torch.cat([h[where] if fn is None else fn(h[where]) for where, fn in spans])

        def add_delta(h):
            delta = torch.cat([deltas[r].to(h.device, h.dtype)[None].expand(self.offsets[r + 1] - self.offsets[r], -1)
                               for r in active])
            bump = torch.zeros_like(h)
            bump[bump_rows.to(h.device), last.to(h.device)] = delta
            return h + bump

        sites = [Site("mlp_in", self.layer), Site("mlp", self.layer), Site("resid", self.layer)]
        first = any(self.initials[r] is None for r in active)
        edits = {Site("mlp", self.layer): add_delta}
        if any(fn is not None for _, fn in spans):
            edits[Site("embed")] = embed
        out = self.model.forward(self.ids[index], edits=edits, grad=torch.is_grad_enabled(),
                                 capture=sites if first else (), logits=self.cols[index])
        results, at = [], 0
        for r in active:
            er = self.rows[r]
            own = out.logits[at: at + er.input_ids.shape[0]]
            if self.initials[r] is None:  # the first pass is at delta = 0: the original values
                rows_at, positions = torch.arange(at, at + er.n_templates), er.subject_last[: er.n_templates]
                self.initials[r] = SubjectValues(*(out.captured[s][rows_at.to(out.captured[s].device),
                                                                   positions.to(out.captured[s].device)]
                                                   .detach().float() for s in sites))
            at += er.input_ids.shape[0]
            nll, kl, self.kl_init[r] = value_terms(er, own[: er.n_templates, : er.target_pos.shape[1]],
                                                   own[er.n_templates, 0] if er.has_kl else None,
                                                   self.template_weights[r], self.kl_init[r])
            results.append((nll, kl))
        return results


# ---- v* for many requests --------------------------------------------------------------------------
def default_batch(device) -> int:
    """Requests optimised (and points scored) together when the caller does not say.

    1 on a CPU: measured on SmolLM2-135M (one thread, 4 CounterFact points, ROME at layer 8, edit
    + scoring), 4 together cost 18.2 s -> 20.0 s per point: the rows and columns padded to the
    longest request cost more than the larger matrix products save. 16 on a GPU, where one
    request's ~22 rows x ~3 positions fill little of the device: on an H200 (GPT-J-6B's shapes,
    bfloat16) 16 requests' v* took 0.21 s each against 1.14 s alone, and a ROME sweep item
    (edit + scoring) 0.74 s with 16 points together. (FT tuned together, ``finetune_batch``, is
    2.2x faster per edit even on this CPU, 8 points: 3.71 -> 1.66 s; with its scoring batched too,
    the item is slower, 6.5 -> 7.5 s, so the default stays 1 here.)"""
    return 16 if torch.device(device).type == "cuda" else 1


@dataclass
class FoundValue:
    """One request's v*: the optimisation's result, the first pass's states and how it ran."""

    result: ValueResult
    initial: SubjectValues
    engine: str  # "blocks" or "hooks" (``ValueObjective.engine``)
    batch: int  # requests optimised together
    seconds: float  # this request's share of the batch's time


def find_values(model, rows: Sequence[EditRows], layer: int, hp, minimize: Sequence[bool], reference_site: str,
                *, noises: Sequence[NoisePasses] | None = None, weights: Sequence[torch.Tensor | None] | None = None,
                batch: int | None = None) -> list[FoundValue]:
    """v* of every request, ``batch`` requests optimised together: from a recording
    (``BatchedObjective``) where the noise is fixed across passes, in whole passes
    (``WholePassObjective``) where every request's noise is drawn afresh per pass."""
    batch = default_batch(model.device) if batch is None else batch
    check(isinstance(batch, int) and batch >= 1, f"batch must be a positive integer, got {batch!r}")
    noises = list(noises) if noises is not None else [NoisePasses(r, model.d_model) for r in rows]
    weights = list(weights) if weights is not None else [None] * len(rows)
    out: list[FoundValue] = []
    for at in range(0, len(rows), batch):
        chunk = range(at, min(at + batch, len(rows)))
        started = time.perf_counter()
        fresh = [noises[i].fresh for i in chunk]
        check(all(fresh) or not any(fresh), "a batch mixes noise drawn afresh per pass with fixed noise")
        kind = WholePassObjective if all(fresh) else BatchedObjective
        objective = kind(model, [rows[i] for i in chunk], layer, [weights[i] for i in chunk],
                         noises=[noises[i] for i in chunk])
        found = optimize_values(objective, hp, [minimize[i] for i in chunk], reference_site)
        share = (time.perf_counter() - started) / len(chunk)
        out += [FoundValue(f, objective.initial(j), objective.engine, len(chunk), share) for j, f in enumerate(found)]
    return out


def shared_values(model, rows: Sequence[EditRows], layer: int, hp, minimize: Sequence[bool], reference_site: str,
                  noises: Sequence[NoisePasses], *, engine: str = "auto",
                  weights: Sequence[torch.Tensor | None] | None = None, batch: int | None = None) -> dict[int, FoundValue]:
    """{request index: v*} for the requests that share passes (``find_values``): noise fixed across
    passes always, noise drawn afresh per pass where ``batch`` > 1 and two or more have it. The
    others (``engine="hooks"``, a lone request under fresh noise, batch 1) are left to the caller,
    which runs them one by one (``kv_core.ValueObjective``)."""
    weights = list(weights) if weights is not None else [None] * len(rows)
    batch_size = default_batch(model.device) if batch is None else batch
    fixed = [i for i in range(len(rows)) if engine != "hooks" and not noises[i].fresh]
    fresh = [i for i in range(len(rows)) if engine != "hooks" and noises[i].fresh]
    groups = [fixed] + ([fresh] if len(fresh) > 1 and batch_size > 1 else [])
    found: dict[int, FoundValue] = {}
    for group in groups:
        found.update(zip(group, find_values(model, [rows[i] for i in group], layer, hp, [minimize[i] for i in group],
                                            reference_site, noises=[noises[i] for i in group],
                                            weights=[weights[i] for i in group], batch=batch)))
    return found
