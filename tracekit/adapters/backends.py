"""Backends: how hook functions attach to a model, one class per wrapper library.

Every backend runs the same underlying HF modules, so weights edited through
``Backend.hf`` are seen by all of them. A backend's one job is ``run``: a forward pass
that applies ``edits`` (site -> pure function of the site's tensor), records ``capture``
sites, and returns logits (all positions, or one position per row).

Which savings each backend gets in the tracing kernel is documented in
``tracekit/tracing/engine.py``; all three accept batched, masked hook functions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from tracekit.adapters.architectures import ArchAdapter, Site, _get
from tracekit.errors import TracekitError

HookFn = Callable[[torch.Tensor], torch.Tensor]

# Execution order inside one layer; nnsight requires modules to be touched in this order.
_ORDER = {"embed": 0, "attn": 1, "mlp_in": 2, "mlp": 3, "resid": 4}


def execution_order(sites: Iterable[Site]) -> list[Site]:
    return sorted(set(sites), key=lambda s: (-1 if s.layer is None else s.layer, _ORDER[s.kind]))


@dataclass
class RunOutput:
    logits: torch.Tensor  # [batch, pos, vocab], or [batch, vocab] when positions were given
    captured: dict[Site, torch.Tensor] = field(default_factory=dict)


def _gather(hidden: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        return hidden
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]


class Backend:
    """Base class. Subclasses implement ``_forward``; ``run`` handles grad mode."""

    name = "base"

    def __init__(self, hf_model: nn.Module, adapter: ArchAdapter, tokenizer):
        self.hf = hf_model
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.wrapper: object = hf_model

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        edits: Mapping[Site, HookFn] | None = None,
        capture: Iterable[Site] = (),
        positions: torch.Tensor | None = None,
        grad: bool = False,
    ) -> RunOutput:
        """One forward pass. Rows are right-padded, so no attention mask is needed:
        under causal attention, padding after a row's last real token never reaches it."""
        edits = dict(edits or {})
        capture = list(capture)
        for site in [*edits, *capture]:
            if site.layer is not None:
                self.adapter.check_layer(self.hf, site.layer)
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            return self._forward(input_ids.to(self.device), edits, capture, positions)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def _forward(self, input_ids, edits, capture, positions) -> RunOutput:  # pragma: no cover
        raise NotImplementedError


def _apply_to_output(output, fn: HookFn):
    """Sublayer outputs may be tensors or tuples whose first item is the hidden state."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class HFBackend(Backend):
    """Plain transformers with torch forward hooks: the thinnest, fastest path."""

    name = "hf"

    def _forward(self, input_ids, edits, capture, positions):
        captured: dict[Site, torch.Tensor] = {}
        handles = []
        try:
            for site in execution_order([*edits, *capture]):
                module = self.adapter.module(self.hf, site)
                fn, keep = edits.get(site), site in capture
                if site.kind == "mlp_in":
                    handles.append(module.register_forward_pre_hook(_pre_hook(site, fn, keep, captured)))
                else:
                    handles.append(module.register_forward_hook(_post_hook(site, fn, keep, captured)))
            hidden = self.adapter.base_model(self.hf)(input_ids=input_ids, use_cache=False).last_hidden_state
            logits = self.adapter.unembed_module(self.hf)(_gather(hidden, positions))
        finally:
            for handle in handles:
                handle.remove()
        return RunOutput(logits, captured)


def _pre_hook(site, fn, keep, captured):
    def hook(module, args):
        x = args[0]
        if fn is not None:
            x = fn(x)
        if keep:
            captured[site] = x
        return (x, *args[1:])

    return hook


def _post_hook(site, fn, keep, captured):
    def hook(module, args, output):
        if fn is not None:
            output = _apply_to_output(output, fn)
        if keep:
            captured[site] = _first(output)
        return output

    return hook


class TransformerLensBackend(Backend):
    """TransformerLens 4 ``TransformerBridge`` over the same HF modules, hooks by hook name."""

    name = "transformer_lens"

    def __init__(self, hf_model, adapter, tokenizer, config_dir: str):
        super().__init__(hf_model, adapter, tokenizer)
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise TracekitError("TransformerLens is not installed: pip install 'transformer-lens>=4.3'") from err
        self.wrapper = TransformerBridge.boot_transformers(config_dir, hf_model=hf_model, tokenizer=tokenizer)

    def _forward(self, input_ids, edits, capture, positions):
        captured: dict[Site, torch.Tensor] = {}
        hooks = []
        for site in execution_order([*edits, *capture]):
            fn, keep = edits.get(site), site in capture

            def hook(tensor, hook, site=site, fn=fn, keep=keep):
                if fn is not None:
                    tensor = fn(tensor)
                if keep:
                    captured[site] = tensor
                return tensor

            hooks.append((self.adapter.tl_hook(site), hook))
        logits = self.wrapper.run_with_hooks(input_ids, fwd_hooks=hooks, return_type="logits")
        return RunOutput(_gather(logits, positions), captured)


class NNsightBackend(Backend):
    """nnsight ``TransformersModel`` (its ``LanguageModel``, deprecated since nnsight 0.8, for older
    versions): interventions written against the module tree."""

    name = "nnsight"

    def __init__(self, hf_model, adapter, tokenizer):
        super().__init__(hf_model, adapter, tokenizer)
        try:
            import nnsight
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise TracekitError("nnsight is not installed: pip install 'nnsight>=0.8'") from err
        if hasattr(nnsight, "TransformersModel"):
            self.wrapper = nnsight.TransformersModel(hf_model, task="text-generation", tokenizer=tokenizer)
        else:  # pragma: no cover - nnsight before TransformersModel
            self.wrapper = nnsight.LanguageModel(hf_model, tokenizer=tokenizer)

    def _forward(self, input_ids, edits, capture, positions):
        saved = {}
        with self.wrapper.trace(input_ids):
            for site in execution_order([*edits, *capture]):
                envoy = _get(self.wrapper, self.adapter.path(site))
                fn = edits.get(site)
                if site.kind == "mlp_in":
                    if fn is not None:
                        envoy.input = fn(envoy.input)
                    value = envoy.input
                else:
                    if fn is not None:
                        envoy.output = _apply_to_output(envoy.output, fn)
                    value = _first(envoy.output)
                if site in capture:
                    saved[site] = value.save()
            logits = self.wrapper.output.logits.save()
        return RunOutput(_gather(logits, positions), dict(saved))


BACKENDS = ("hf", "transformer_lens", "nnsight")
_ALIASES = {"tl": "transformer_lens", "transformerlens": "transformer_lens", "transformers": "hf"}


def make_backend(name: str, hf_model, adapter, tokenizer, config_dir: str | None) -> Backend:
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "hf":
        return HFBackend(hf_model, adapter, tokenizer)
    if key == "transformer_lens":
        if config_dir is None:
            raise TracekitError("the TransformerLens backend needs a local config folder for this model")
        return TransformerLensBackend(hf_model, adapter, tokenizer, config_dir)
    if key == "nnsight":
        return NNsightBackend(hf_model, adapter, tokenizer)
    raise TracekitError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
