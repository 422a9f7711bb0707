"""FT-1 / FT-5 of several requests at one layer window, every request's row in each pass.

``apply_ft`` tunes one request's down-projections with one row per pass: on a GPU each step is a
whole launch-bound pass for a dozen tokens (1.4 s per GPT-J edit on an H200). Here k requests
share the passes. Each keeps its own copy of the tuned parameters, its own Adam (torch's, on
those copies), its own stopping rule and clamp; its row computes the tuned layers' output with
its own copy (the model's parameters stay as they are), so rows never meet: right-padded, they
attend only to their own earlier tokens. Every request therefore follows exactly its single
``apply_ft`` schedule, and the parameters equal k single runs up to floating-point
reassociation (tests).

Requests whose subject is noised (Fact Forcing) draw fresh noise per pass in their own stream
and run one by one through ``apply_ft``; so does a batch of one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from tracekit import prompts as P
from tracekit.adapters import Site
from tracekit.editing.delta import Edit
from tracekit.editing.finetune import FTHyperParams, Objective, _name_of, apply_ft, clamp, ft_info, tuned_parameters
from tracekit.editing.request import EditRequest
from tracekit.editing.subject_noise import as_subject_noise
from tracekit.editing.windows import edit_window
from tracekit.errors import TracekitError, check


def apply_ft_many(model, requests: Sequence[EditRequest], layer: int, hparams: FTHyperParams) -> list[Edit]:
    """``apply_ft`` for each request (same layer window and hyperparameters), the noise-free ones
    tuned together (module doc). The model is left exactly as it was; no Edit is applied."""
    check(isinstance(hparams, FTHyperParams), f"FT needs FTHyperParams, got {type(hparams).__name__}")
    requests = list(requests)
    together = [i for i, r in enumerate(requests) if as_subject_noise(model, r) is None]
    out: list[Edit | None] = [None] * len(requests)
    if len(together) > 1:
        for i, edit in zip(together, _tune_together(model, [requests[i] for i in together], layer, hparams)):
            out[i] = edit
    return [edit if edit is not None else apply_ft(model, r, layer, hparams) for edit, r in zip(out, requests)]


@dataclass
class _Run:
    """One request's own state: its parameter copies, Adam and stopping bookkeeping."""

    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    request: EditRequest
    target: list[int]
    objective: Objective
    losses: list[float] = field(default_factory=list)
    final_nll: float = float("nan")
    steps_taken: int = 0
    done: bool = False


def _tune_together(model, requests: list[EditRequest], layer: int, hp: FTHyperParams) -> list[Edit]:
    layers = edit_window(model, layer, hp.n_layers, hp.clip_window, f"FT-{hp.n_layers}")
    originals = tuned_parameters(model, layers, hp.train_bias)
    names = [_name_of(model, p) for p in originals]
    per_layer = _slots(model, layers, hp.train_bias)
    runs = []
    for request in requests:
        copies = [p.detach().clone().requires_grad_(True) for p in originals]
        runs.append(_Run(copies, torch.optim.Adam(copies, lr=hp.lr, weight_decay=hp.weight_decay), request,
                         model.target_ids(request.target), Objective(request.minimize, hp)))
    rows = _Rows(model, runs, layers[0])
    started = time.perf_counter()
    for _ in range(hp.steps):
        active = [r for r, run in enumerate(runs) if not run.done]
        if not active:
            break
        nlls = rows.nlls(active, per_layer, hp)
        stepping, total = [], None
        for r, nll in zip(active, nlls):
            run = runs[r]
            loss, below = run.objective(nll)
            run.losses.append(float(loss.detach()))
            run.final_nll = float(nll.detach())
            if below:
                run.done = not run.request.minimize  # noise-free: nothing can change any more
            else:
                stepping.append(r)
                total = loss if total is None else total + loss
        if stepping:
            for r in stepping:
                runs[r].optimizer.zero_grad(set_to_none=True)
            total.backward()  # each copy gets its own request's gradient: rows never meet
            for r in stepping:
                runs[r].optimizer.step()
                runs[r].steps_taken += 1
                runs[r].final_nll = float("nan")
        for r in active:
            clamp(runs[r].params, originals, hp.norm_constraint)
    seconds = (time.perf_counter() - started) / len(runs)
    edits = []
    for run in runs:
        info = ft_info(hp, layers, seconds, run.steps_taken, run.losses, run.final_nll, rows.engine, None,
                       {"parameters": names, "batch": len(runs)})
        edits.append(Edit(model.hf, {n: p.detach().clone() for n, p in zip(names, run.params)}, info=info, model=model))
    return edits


def _slots(model, layers: list[int], train_bias: bool) -> dict[int, tuple[int, int | None]]:
    """Per tuned layer: where its weight, and its bias (or None), sit in ``tuned_parameters``'s list."""
    slots, at = {}, 0
    for layer in layers:
        count = len(tuned_parameters(model, [layer], train_bias))
        slots[layer] = (at, at + 1 if count == 2 else None)
        at += count
    return slots


class _Rows:
    """Every request's row (prompt + target, right-padded), the frozen layers below the window run
    once, and per step the rest with each row's tuned layers computed from its own copies."""

    def __init__(self, model, runs: list[_Run], lowest: int):
        self.model, self.runs, self.lowest = model, runs, lowest
        prompts = [P.token_ids(model.tokenizer, run.request.text) for run in runs]
        rows = [prompt + run.target[:-1] for prompt, run in zip(prompts, runs)]
        self.prefix = [len(prompt) for prompt in prompts]
        width = max(map(len, rows))
        pad = model.tokenizer.pad_token_id
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        self.m = max(len(run.target) for run in runs)
        cols = []
        for start, run in zip(self.prefix, runs):  # a shorter target repeats its last column (ignored)
            own = list(range(start - 1, start - 1 + len(run.target)))
            cols.append(own + [own[-1]] * (self.m - len(own)))
        self.cols = torch.tensor(cols)
        entry = Site("resid_pre", lowest)
        with torch.no_grad():
            self.hidden = model.forward(ids, stop_layer=lowest + 1, capture=[entry]).captured[entry]
        self.engine = "blocks" if model.forward_path == "blocks" else "forward"

    def nlls(self, active: list[int], slots, hp: FTHyperParams) -> list[torch.Tensor]:
        """Each active request's NLL of its target (summed or averaged over its tokens)."""
        model, index = self.model, torch.tensor(active)
        keys: dict[int, torch.Tensor] = {}

        def keep_key(layer):
            def edit(k):
                keys[layer] = k
                return k
            return edit

        def own_output(layer):
            w_at, b_at = slots[layer]

            def edit(out):
                k = keys.pop(layer)
                rows = []
                for j, r in enumerate(active):
                    params = self.runs[r].params
                    weight = model.adapter.as_out_in(params[w_at])
                    rows.append(torch.nn.functional.linear(k[j: j + 1], weight.to(k.dtype),
                                                           None if b_at is None else params[b_at].to(k.dtype)))
                return torch.cat(rows).to(out.dtype)
            return edit

        edits = {}
        for layer in slots:
            edits[Site("mlp_in", layer)] = keep_key(layer)
            edits[Site("mlp", layer)] = own_output(layer)
        hidden = self.hidden[index.to(self.hidden.device)]
        logits = model.forward(hidden=hidden, start_layer=self.lowest, edits=edits, logits=self.cols[index],
                               grad=True).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for j, r in enumerate(active):
            target = torch.tensor(self.runs[r].target, device=logp.device)
            token_logp = logp[j, : len(target)].gather(-1, target[:, None])[:, 0]
            per_row = token_logp.sum() if hp.loss_reduction == "sum" else token_logp.mean()
            if not per_row.requires_grad:
                raise TracekitError("this backend gives no gradients to the down-projection; fine-tune with backend='hf'")
            out.append(-per_row)
        return out
