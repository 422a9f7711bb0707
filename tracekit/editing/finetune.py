"""FT-1 / FT-5: constrained fine-tuning of MLP down-projections (the paper's FT baseline).

Adam on the down-projection weights of 1 or 5 adjacent layers centred on the edit layer.
Loss: the target's NLL over ALL its tokens, teacher forced (the original FT code scored
every target token at the last prompt position; we do not port that bug), averaged over
tokens; Fact Erasure minimises the negative of it. After every step each weight is
clamped into the L-infinity ball of radius ``norm_constraint`` around its original value.
Orientation (GPT-2's transposed Conv1D) does not matter here: the clamp is elementwise.

Cost: logits are computed only at the positions that score the target. On the hf backend
the layers below the lowest edited layer run ONCE, without gradients (``BlockDriver``), and
each step runs only the layers from there up; elsewhere each step is a whole forward pass
(autograd still builds no graph below the lowest edited layer: nothing there needs one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from tracekit.adapters import Site
from tracekit.adapters.blocks import BlockDriver
from tracekit.editing.delta import Edit
from tracekit.editing.logprobs import Query, text_query, token_logprobs
from tracekit.editing.request import EditRequest
from tracekit.editing.windows import edit_window
from tracekit.errors import TracekitError, check


@dataclass(frozen=True)
class FTHyperParams:
    n_layers: int = 1  # 1 for FT-1, 5 for FT-5: a window centred on the edit layer
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float | None = 5e-5  # L-inf radius around the original weights; None = free
    weight_decay: float = 0.0
    stop_loss: float | None = 1e-2  # stop once the target NLL is below this (maximising only)
    layer: int | None = None  # this preset's default edit layer (None: the model's middle layer)
    clip_window: bool = False  # True: cut FT-5's window at the model's edges instead of an error
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


def down_proj_name(model, layer: int) -> str:
    """The down-projection's parameter name (wrappers such as the TransformerLens bridge rename
    the module tree, so it is found by identity rather than built from the path)."""
    weight = model.adapter.down_proj_weight(model.hf, layer)
    for name, param in model.hf.named_parameters():
        if param is weight:
            return name
    raise TracekitError(f"layer {layer}'s down-projection is not a parameter of this model")  # pragma: no cover


def apply_ft(model, request: EditRequest, layer: int, hparams: FTHyperParams) -> Edit:
    """Fine-tune toward (or, if ``request.minimize``, away from) ``request.target``.

    The model is left exactly as it was; the returned ``Edit`` is not applied.
    """
    check(isinstance(hparams, FTHyperParams), f"FT needs FTHyperParams, got {type(hparams).__name__}")
    layers = edit_window(model, layer, hparams.n_layers, hparams.clip_window, f"FT-{hparams.n_layers}")
    weights = [model.adapter.down_proj_weight(model.hf, l) for l in layers]
    originals = [w.detach().clone() for w in weights]
    query = text_query(model, request.text, request.target, request.subject, request.noise)
    target_logprobs = _scorer(model, query, lowest_layer=layers[0])
    eps = hparams.norm_constraint
    losses: list[float] = []  # target NLL before each step
    steps_taken = 0
    started = time.perf_counter()
    try:
        for w in weights:
            w.requires_grad_(True)
        optimizer = torch.optim.Adam(weights, lr=hparams.lr, weight_decay=hparams.weight_decay)
        for _ in range(hparams.steps):
            optimizer.zero_grad(set_to_none=True)
            nll = -target_logprobs().mean()
            losses.append(float(nll.detach()))
            if not request.minimize and hparams.stop_loss is not None and losses[-1] < hparams.stop_loss:
                break
            loss = -nll if request.minimize else nll
            if not loss.requires_grad:
                raise TracekitError("this backend gives no gradients to the down-projection; fine-tune with backend='hf'")
            loss.backward()
            optimizer.step()
            steps_taken += 1
            if eps is not None:
                with torch.no_grad():
                    for w, w0 in zip(weights, originals):
                        w.copy_(torch.minimum(torch.maximum(w, w0 - eps), w0 + eps))
        new = {down_proj_name(model, l): w.detach().clone() for l, w in zip(layers, weights)}
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, originals):
                w.requires_grad_(False)
                w.copy_(w0)
    info = dict(method=f"ft-{hparams.n_layers}", layers=layers, steps_taken=steps_taken, losses=losses,
                seconds=time.perf_counter() - started)
    return Edit(model.hf, new, info=info)


def _scorer(model, query: Query, lowest_layer: int) -> Callable[[], torch.Tensor]:
    """A function giving log p of each target token (with gradients) under the current weights."""
    driver = BlockDriver(model.hf, model.adapter)
    if model.backend.name != "hf" or driver.unsupported_reason() is not None:
        return lambda: token_logprobs(model, [query], grad=True)[0]
    from tracekit.tracing.noise import subject_noise_hook

    ids = torch.tensor([query.prefix + query.continuation[:-1]])
    edits = {} if query.noise is None else {Site("embed"): subject_noise_hook(query.noise[None], query.noise_start)}
    with torch.no_grad():  # the frozen bottom of the model, once
        hidden = driver.block0_input(ids, edits)
        positions = driver.positions(0, ids.shape[1], hidden)
        for layer in range(lowest_layer):
            hidden, _ = driver.block(layer, hidden, positions)
    scored = torch.arange(len(query.prefix) - 1, len(query.prefix) - 1 + len(query.continuation), device=hidden.device)
    tokens = torch.tensor(query.continuation, device=hidden.device)

    def target_logprobs() -> torch.Tensor:
        h = hidden
        for layer in range(lowest_layer, len(driver.blocks)):
            h, _ = driver.block(layer, h, positions)
        logits = driver.unembed(driver.norm(h[0, scored])).float()
        return torch.log_softmax(logits, dim=-1)[torch.arange(len(tokens), device=h.device), tokens]

    return target_logprobs


# ---- presets ------------------------------------------------------------------------------
# Paper appendix (Hase et al. 2023): norm_constraint per problem as (FT-1, FT-5); 25 steps
# (50 for Fact Forcing), Adam lr 5e-4 as in the public constrained-FT config.
_PAPER_NORMS = {
    "gpt-j-6b": {"error-injection": (1e-4, 2e-5), "tracing-reversal": (1e-5, 2e-5), "fact-erasure": (1e-5, 1e-5),
                 "fact-amplification": (1e-5, 1e-5), "fact-forcing": (1e-4, 1e-4)},
    # The appendix gives GPT2-XL values for these two problems only.
    "gpt2-xl": {"error-injection": (1e-3, 1e-4), "fact-forcing": (5e-4, 5e-5)},
}
# The paper's default edit layer (0-based): GPT-J "layer 6", GPT2-XL "layer 18".
_DEFAULT_LAYER = {"gpt-j-6b": 5, "gpt2-xl": 17}

FT_PRESETS: dict[str, FTHyperParams] = {
    "gpt-j-6b/constrained": FTHyperParams(steps=25, lr=5e-4, norm_constraint=5e-5, layer=21,
                                          source="public ROME repo, FT gpt-j-6B constrained (layer 21)"),
}
for _fam, _table in _PAPER_NORMS.items():
    for _problem, _norms in _table.items():
        for _n, _norm in zip((1, 5), _norms):
            FT_PRESETS[f"{_fam}/{_problem}/ft-{_n}"] = FTHyperParams(
                n_layers=_n, steps=50 if _problem == "fact-forcing" else 25, lr=5e-4, norm_constraint=_norm,
                layer=_DEFAULT_LAYER[_fam], source=f"paper appendix, {_fam} {_problem} FT-{_n}")


# SmolLM2-135M (bundled): tuned by tracekit, see SMOLLM2_FT_NOTE.
SMOLLM2_FT_NOTE = """How the SmolLM2-135M FT presets were chosen (Error Injection).

The default layer is ROME's preset layer for this model (``hparams.SMOLLM2_NOTE``, now 3).
The GPT-J values barely move this model: its down-projections have 1536 inputs (GPT-J:
16384), so an L-inf ball of 5e-5..1e-4 allows a far smaller change of the MLP output
(FT-1, layer 4, norm 5e-5 / 1e-4: Darrieux rewrite 0.005 / 0.010). With Adam's first step
already reaching the ball (lr >= norm), the radius is what matters, and lr = norm.
Facts: "The mother tongue of Danielle Darrieux is" -> " English" (p before 0.033) and 7
built-in world facts (tracekit.data.world_facts indices 0, 20, 60, 80, 100, 120, 140);
rewrite scores, Darrieux first:
  FT-1 layer 4, norm 2e-3: 0.933, mean 0.42 (min 0.008)
  FT-1 layer 4, norm 5e-3: 0.991, mean 0.977 (min 0.932)
  FT-1 layer 3, norm 5e-3: 0.990, mean 0.980 (min 0.959)   <- FT-1 preset
  FT-5 layer 4, norm 1e-3: 0.992, mean 0.984 (min 0.962)
  FT-5 layer 4, norm 2e-3: 0.993, mean 0.991
  FT-5 layer 3, norm 1e-3: 0.991, mean 0.987 (min 0.974)   <- FT-5 preset (1/5 of FT-1,
                                                             the paper's GPT-J ratio)
Darrieux, FT-1 norm 5e-3 at other layers: 8: 0.990, 12: 0.948, 16: 0.706, 20: 0.869.
Early stopping at target NLL < 0.01 (the public FT code's rule) keeps rewrite <= ~0.99, the
paper's tuning criterion. The other problems use the same radii (not tuned separately);
Fact Forcing takes 50 steps as in the paper (Darrieux, layer 3: FT-1 0.985, FT-5 0.990)."""
_SMOLLM2_NORM = {1: 5e-3, 5: 1e-3}


def model_family(model) -> str:
    """The preset family of a model, from its shape: gpt-j-6b, gpt2-xl, smollm2-135m or generic."""
    from tracekit.editing.hparams import _family

    return _family(model)


def ft_preset(model, problem: str = "error-injection", n_layers: int = 1) -> FTHyperParams:
    """The FT hyperparameters for this model, problem and window (FT-1 or FT-5)."""
    family = model_family(model)
    key = f"{family}/{problem}/ft-{n_layers}"
    if key in FT_PRESETS:
        return FT_PRESETS[key]
    steps = 50 if problem == "fact-forcing" else 25
    if family == "smollm2-135m":
        from tracekit.editing.hparams import rome_preset

        norm = _SMOLLM2_NORM.get(n_layers, _SMOLLM2_NORM[5])
        return FTHyperParams(n_layers=n_layers, steps=steps, lr=norm, norm_constraint=norm,
                             layer=rome_preset(family).layer, source="tracekit, SmolLM2-135M (see SMOLLM2_FT_NOTE)")
    if family in _PAPER_NORMS:  # GPT2-XL problems the appendix does not tune: its Error Injection values
        base = FT_PRESETS[f"{family}/error-injection/ft-{n_layers}"]
        return replace(base, steps=steps, source=base.source + f" (no {problem} value published)")
    return FTHyperParams(n_layers=n_layers, steps=steps, source="public GPT-J constrained FT (generic model)")
