"""FT-1 / FT-5: constrained fine-tuning of MLP down-projections, as the paper's code
(google/belief-localization, ``baselines/ft/ft_main.py``).

Adam on the down-projection weights AND biases (every parameter of the module; Llama's have
no bias) of 1 or 5 adjacent layers centred on the edit layer. The loss is the target's NLL
summed over its tokens (teacher forced; the original ROME-repo FT scored every target token at
the last prompt position, a bug not ported), summed over the batch rows. Fact Erasure
minimises the target's probability exp(-NLL) instead. A step is taken only while the loss is
>= ``stop_loss`` (1e-2), and after each pass every parameter is clamped into the L-infinity
ball of radius ``norm_constraint`` around its original value; five passes in a row below
``stop_loss`` end the run (maximising problems; with noise fixed across passes the first such
pass ends it, with the same result). Fact Forcing under the paper code's noise runs
``noise_rows`` (10) copies of the prompt per pass, each with its own draw.
Orientation (GPT-2's transposed Conv1D) does not matter here: the clamp is elementwise.

Cost: logits are computed only at the positions that score the target. Without noise drawn afresh per pass, the layers below the lowest edited layer run ONCE,
without gradients, and each step runs only the layers from there up (both through the partial
forward ``Model.forward``, so the backend the user chose is honoured); otherwise each step is a
whole forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
import torch

from tracekit import prompts as P
from tracekit.adapters import Site
from tracekit.editing.delta import Edit
from tracekit.editing.info import EditInfo
from tracekit.editing.request import EditRequest
from tracekit.editing.subject_noise import as_subject_noise
from tracekit.editing.windows import edit_window
from tracekit.errors import TracekitError, check
from tracekit.tracing.noise import spans_noise_hook

PATIENCE = 5  # passes below stop_loss before the paper's FT stops

@dataclass(frozen=True)
class FTHyperParams:
    n_layers: int = 1  # 1 for FT-1, 5 for FT-5: a window centred on the edit layer
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float | None = 5e-5  # L-inf radius around the original weights; None = free
    weight_decay: float = 0.0
    stop_loss: float | None = 1e-2  # no step while the loss is below this; the paper's code (None: always step)
    layer: int | None = None  # this preset's default edit layer (None: the model's middle layer)
    clip_window: bool = False  # True: cut FT-5's window at the model's edges instead of an error
    # conventions of the paper's code; tracekit 0.1: "mean", False, "log-probability" (LEGACY_FT)
    loss_reduction: str = "sum"  # the target's NLL summed over its tokens ("sum") or averaged ("mean")
    train_bias: bool = True  # tune the down-projection's bias too, as the paper's code
    erasure_objective: str = "probability"  # Fact Erasure minimises exp(-NLL) or -NLL ("log-probability")
    noise_rows: int = 10  # Fact Forcing, paper-code noise: copies of the prompt per pass, each its own draw
    source: str = ""  # where the values come from

    def __post_init__(self):
        check(isinstance(self.n_layers, int) and self.n_layers >= 1, f"FT n_layers must be >= 1, got {self.n_layers}")
        check(isinstance(self.steps, int) and self.steps >= 1, f"FT steps must be >= 1, got {self.steps}")
        check(self.lr > 0, f"FT learning rate must be positive, got {self.lr}")
        check(self.norm_constraint is None or self.norm_constraint > 0,
              f"FT norm_constraint must be positive (or None for no constraint), got {self.norm_constraint}")
        check(self.weight_decay >= 0, f"FT weight_decay must be >= 0, got {self.weight_decay}")
        check(self.stop_loss is None or self.stop_loss >= 0, f"FT stop_loss must be >= 0, got {self.stop_loss}")
        check(self.layer is None or (isinstance(self.layer, int) and self.layer >= 0),
              f"FT default layer must be >= 0, got {self.layer}")
        check(self.loss_reduction in ("sum", "mean"), f"FT loss_reduction must be 'sum' or 'mean', got {self.loss_reduction!r}")
        check(self.erasure_objective in ("probability", "log-probability"),
              f"FT erasure_objective must be 'probability' or 'log-probability', got {self.erasure_objective!r}")
        check(isinstance(self.noise_rows, int) and self.noise_rows >= 1, f"FT noise_rows must be >= 1, got {self.noise_rows}")


LEGACY_FT = dict(loss_reduction="mean", train_bias=False, erasure_objective="log-probability")


def down_proj_name(model, layer: int) -> str:
    """The down-projection's parameter name (wrappers such as the TransformerLens bridge rename
    the module tree, so it is found by identity rather than built from the path)."""
    return _name_of(model, model.adapter.down_proj_weight(model.hf, layer))


def _name_of(model, param) -> str:
    for name, candidate in model.hf.named_parameters():
        if candidate is param:
            return name
    raise TracekitError("an edited parameter is not a parameter of this model")  # pragma: no cover


def tuned_parameters(model, layers: list[int], train_bias: bool) -> list[torch.nn.Parameter]:
    """The down-projection weight of each layer, and its bias if it has one and ``train_bias``."""
    params = []
    for layer in layers:
        params.append(model.adapter.down_proj_weight(model.hf, layer))
        bias = getattr(model.adapter.down_proj_module(model.hf, layer), "bias", None)
        if train_bias and isinstance(bias, torch.nn.Parameter):
            params.append(bias)
    return params


def apply_ft(model, request: EditRequest, layer: int, hparams: FTHyperParams) -> Edit:
    """Fine-tune toward (or, if ``request.minimize``, away from) ``request.target``.

    The model is left exactly as it was; the returned ``Edit`` is not applied.
    """
    check(isinstance(hparams, FTHyperParams), f"FT needs FTHyperParams, got {type(hparams).__name__}")
    layers = edit_window(model, layer, hparams.n_layers, hparams.clip_window, f"FT-{hparams.n_layers}")
    params = tuned_parameters(model, layers, hparams.train_bias)
    names = [_name_of(model, p) for p in params]
    originals = [p.detach().clone() for p in params]
    scorer = _Scorer(model, request, layers[0], hparams)
    objective = Objective(request.minimize, hparams)
    losses: list[float] = []  # the loss of each pass
    final_nll = float("nan")
    steps_taken = patience = 0
    started = time.perf_counter()
    try:
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
        for _ in range(hparams.steps):
            optimizer.zero_grad(set_to_none=True)
            nll = scorer.nll()
            loss, below = objective(nll)
            losses.append(float(loss.detach()))
            final_nll = float(nll.detach())  # stays the final NLL unless a step follows
            if not below:
                if not loss.requires_grad:
                    raise TracekitError("this backend gives no gradients to the down-projection; fine-tune with backend='hf'")
                loss.backward()
                optimizer.step()
                steps_taken += 1
                final_nll = float("nan")
            clamp(params, originals, hparams.norm_constraint)
            if not request.minimize:
                patience = patience + 1 if below else 0
                if below and (patience >= PATIENCE or not scorer.fresh):  # nothing can change any more
                    break
        new = {name: p.detach().clone() for name, p in zip(names, params)}
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, originals):
                p.requires_grad_(False)
                p.copy_(p0)
    noise = scorer.noise
    info = ft_info(hparams, layers, time.perf_counter() - started, steps_taken, losses, final_nll, scorer.engine,
                   None if noise is None else noise.as_dict(), {"parameters": names})
    return Edit(model.hf, new, info=info, model=model)


class Objective:
    """The loss of a pass from the target's NLL, and whether it is below the stopping threshold:
    NLL (raise the target), -NLL (lower it), or exp(-NLL) for Fact Erasure's probability objective."""

    def __init__(self, minimize: bool, hparams: FTHyperParams):
        self.minimize, self.stop_loss = minimize, hparams.stop_loss
        self.probability = minimize and hparams.erasure_objective == "probability"
        self.gated = hparams.stop_loss is not None and (self.probability or not minimize)

    def __call__(self, nll: torch.Tensor) -> tuple[torch.Tensor, bool]:
        loss = torch.exp(-nll) if self.probability else (-nll if self.minimize else nll)
        return loss, self.gated and float(loss.detach()) < self.stop_loss


@torch.no_grad()
def clamp(params, originals, eps: float | None) -> None:
    """Every parameter into the L-infinity ball of radius ``eps`` around its original (None: free)."""
    if eps is not None:
        for p, p0 in zip(params, originals):
            p.copy_(torch.minimum(torch.maximum(p, p0 - eps), p0 + eps))


def ft_info(hparams: FTHyperParams, layers, seconds: float, steps_taken: int, losses, final_nll: float, engine: str,
            noise: dict | None, details: dict) -> EditInfo:
    return EditInfo(method=f"ft-{hparams.n_layers}", layers=layers, seconds={"total": seconds}, steps_taken=steps_taken,
                    losses=losses, final_nll=final_nll, engine=engine,
                    conventions={"loss_reduction": hparams.loss_reduction, "train_bias": hparams.train_bias,
                                 "erasure_objective": hparams.erasure_objective},
                    noise=noise, details=details)


class _Scorer:
    """The target's NLL under the current weights (with gradients), pass by pass.

    Every pass goes through the partial forward (``Model.forward``). Without noise drawn afresh
    per pass, the layers below the lowest edited one are run once (their output cannot change)
    and each step runs the rest from there ("blocks" where the seam drives the blocks); else
    each step is a whole pass from the tokens ("forward")."""

    def __init__(self, model, request: EditRequest, lowest_layer: int, hparams: FTHyperParams):
        self.model, self.hparams = model, hparams
        prefix = P.token_ids(model.tokenizer, request.text)
        self.target = model.target_ids(request.target)
        self.noise = as_subject_noise(model, request)
        self.fresh = self.noise is not None and self.noise.fresh_per_pass
        self.source = None if self.noise is None else self.noise.source(model.d_model)
        rows = hparams.noise_rows if self.fresh else 1
        self.ids = torch.tensor([prefix + self.target[:-1]] * rows)
        self.span = None if self.noise is None else model.subject_span(request.text, request.subject)
        self.scored = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(self.target))
        self.split = not self.fresh
        self.engine = "blocks" if self.split and model.forward_path == "blocks" else "forward"
        self.lowest = lowest_layer
        if self.split:
            self._prepare_bottom()

    def _noise_edits(self) -> dict:
        if self.noise is None:
            return {}
        spans, draws, align = self.noise.edit_plan(self.source, [self.span] * self.ids.shape[0])
        return {Site("embed"): spans_noise_hook(spans, draws, align)}

    @torch.no_grad()
    def _prepare_bottom(self) -> None:
        """The frozen bottom of the model, once: block ``lowest``'s input."""
        entry = Site("resid_pre", self.lowest)
        out = self.model.forward(self.ids, stop_layer=self.lowest + 1, edits=self._noise_edits(), capture=[entry])
        self.hidden = out.captured[entry]

    def _logits(self) -> torch.Tensor:
        """[rows, m, V] logits at the scored positions."""
        cols = self.scored.expand(self.ids.shape[0], -1)
        if self.split:
            return self.model.forward(hidden=self.hidden, start_layer=self.lowest, logits=cols, grad=True).logits
        return self.model.forward(self.ids, edits=self._noise_edits(), logits=cols, grad=True).logits

    def nll(self) -> torch.Tensor:
        logp = torch.log_softmax(self._logits().float(), dim=-1)
        target = torch.tensor(self.target, device=logp.device)
        token_logp = logp.gather(-1, target.expand(logp.shape[0], -1)[..., None])[..., 0]  # [rows, m]
        per_row = token_logp.sum(-1) if self.hparams.loss_reduction == "sum" else token_logp.mean(-1)
        return -per_row.sum()
