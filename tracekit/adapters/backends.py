"""Backends: how hook functions attach to a model, one class per wrapper library.

Every backend runs the same underlying HF modules, so weights edited through
``Backend.hf`` are seen by all of them. A backend has two calls:

- ``run``: a whole forward pass that applies ``edits`` (site -> pure function of the
  site's tensor), records ``capture`` sites, and returns logits (all positions, or one
  position per row);
- ``forward``: the partial forward (a slice of layers and positions, branching off a
  recorded pass; design in ``tracekit.adapters.partial``). ``forward_path`` decides, for
  every caller, whether it drives the blocks or runs whole passes through ``run``.

Which savings each backend gets in the tracing kernel is documented in
``tracekit/tracing/engine.py``; all three accept batched, masked hook functions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from tracekit.adapters.architectures import SITE_KINDS, ArchAdapter, Site, _get
from tracekit.adapters.partial import (
    Branch, ForwardStats, Pass, apply_to_output, attention_kernels, first, make_request, shape_policy, whole_pass,
)
from tracekit.errors import TracekitError

HookFn = Callable[[torch.Tensor], torch.Tensor]

# Execution order inside one layer (``SITE_KINDS`` lists kinds in it); nnsight requires modules to
# be touched in this order.
_ORDER = {kind: i for i, kind in enumerate(SITE_KINDS)}


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
        with ctx, attention_kernels(self.device):
            return self._forward(input_ids.to(self.device), edits, capture, positions)

    def forward(
        self,
        ids: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        branch: Branch | None = None,
        start_layer: int | None = None,
        stop_layer: int | None = None,
        edits: Mapping[Site, HookFn] | None = None,
        capture: Iterable[Site] = (),
        logits=None,
        record: bool = False,
        grad: bool = False,
        shapes: str | None = None,
        stats: ForwardStats | None = None,
    ) -> Pass:
        """The partial forward (``tracekit.adapters.partial`` has the design).

        Input: ``ids`` [B, T]; or ``hidden`` [B, P, d], block ``start_layer``'s input at positions
        0..P-1; or a ``branch`` off a recorded pass (with ``hidden``: its rows' entering state).
        Runs blocks ``start_layer .. stop_layer - 1`` (default: to the last) with ``edits`` and
        ``capture`` (sites of those layers; values over the pass's rows and columns only).
        ``logits``: None, "all", or column indices per row ([B] or [B, k]; needs the last layer).
        ``record``: keep every block's input (and keys/values) for later branches.
        ``shapes``: "exact" or "bucketed" (default: bucketed on CUDA); ``stats``: a
        ``ForwardStats`` to count block calls and shapes in.
        """
        request = make_request(self.adapter.n_layers(self.hf), ids, hidden, branch, start_layer, stop_layer,
                               edits, capture, logits, record, grad)
        path, _ = self.forward_path()
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            if path == "blocks":
                return self.driver.forward(request, shape_policy(shapes, self.device), stats)
            return whole_pass(self, request)

    def forward_path(self) -> tuple[str, str | None]:
        """("blocks", None) when ``forward`` drives the HF blocks, else ("whole passes", why not)."""
        return "whole passes", f"the {self.name} backend runs whole forward passes"

    @property
    def driver(self):
        from tracekit.adapters.blocks import BlockDriver

        if getattr(self, "_driver", None) is None:
            self._driver = BlockDriver(self.hf, self.adapter)
        return self._driver

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def _forward(self, input_ids, edits, capture, positions) -> RunOutput:  # pragma: no cover
        raise NotImplementedError


class HFBackend(Backend):
    """Plain transformers with torch forward hooks: the thinnest, fastest path."""

    name = "hf"

    def forward_path(self) -> tuple[str, str | None]:
        reason = self.driver.unsupported_reason()
        return ("blocks", None) if reason is None else ("whole passes", reason)

    def _forward(self, input_ids, edits, capture, positions):
        captured: dict[Site, torch.Tensor] = {}
        handles = []
        try:
            for site in execution_order([*edits, *capture]):
                keep = captured if site in capture else None
                handles.append(self.adapter.attach(self.hf, site, edits.get(site), keep))
            hidden = self.adapter.base_model(self.hf)(input_ids=input_ids, use_cache=False).last_hidden_state
            logits = self.adapter.unembed_module(self.hf)(_gather(hidden, positions))
        finally:
            for handle in handles:
                handle.remove()
        return RunOutput(logits, captured)


class TransformerLensBackend(Backend):
    """TransformerLens 4 ``TransformerBridge`` over the same HF modules, hooks by hook name."""

    name = "transformer_lens"

    def __init__(self, hf_model, adapter, tokenizer, config_dir: str | None = None, bridge=None):
        """Boots a bridge over ``hf_model`` from ``config_dir``, or adopts the user's own ``bridge``
        (whose ``original_model`` is ``hf_model``: ``tracekit.from_transformer_lens``)."""
        super().__init__(hf_model, adapter, tokenizer)
        if bridge is not None:
            self.wrapper = bridge
            return
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
                    tensor = self.adapter.tl_layout(site, fn)(tensor)
                if keep:
                    captured[site] = self.adapter.tl_layout(site)(tensor)
                return tensor

            hooks.append((self.adapter.tl_hook(site), hook))
        logits = self.wrapper.run_with_hooks(input_ids, fwd_hooks=hooks, return_type="logits")
        return RunOutput(_gather(logits, positions), captured)


class NNsightBackend(Backend):
    """nnsight ``TransformersModel`` (its ``LanguageModel``, deprecated since nnsight 0.8, for older
    versions): interventions written against the module tree."""

    name = "nnsight"

    def __init__(self, hf_model, adapter, tokenizer, wrapper=None):
        """Wraps ``hf_model``, or adopts the user's own nnsight model ``wrapper`` over it
        (``tracekit.from_nnsight``)."""
        super().__init__(hf_model, adapter, tokenizer)
        if wrapper is not None:
            self.wrapper = wrapper
            return
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
        # The pattern is no module's input or output: its sites hook the attention function itself.
        patterns = [s for s in execution_order([*edits, *capture]) if self.adapter.hook(s).pattern]
        kept: dict[Site, torch.Tensor] = {}
        handles = [self.adapter.attach(self.hf, s, edits.get(s), kept if s in capture else None) for s in patterns]
        try:
            logits = self._trace(input_ids, edits, capture, saved, set(patterns))
        finally:
            for handle in handles:
                handle.remove()
        return RunOutput(_gather(logits, positions), {**dict(saved), **kept})

    def _trace(self, input_ids, edits, capture, saved, skip):
        with self.wrapper.trace(input_ids):
            for site in execution_order([*edits, *capture]):
                if site in skip:
                    continue
                hook = self.adapter.hook(site)
                envoy = _get(self.wrapper, hook.path)
                fn = edits.get(site)
                if fn is not None:
                    edit = lambda x, fn=fn, hook=hook: hook.apply(x, fn, self.adapter, self.hf)  # noqa: E731
                    if hook.input:
                        envoy.input = edit(envoy.input)
                    else:
                        envoy.output = apply_to_output(envoy.output, edit)
                value = envoy.input if hook.input else first(envoy.output)
                if site in capture:
                    saved[site] = hook.view(value, self.adapter, self.hf).save()
            logits = self.wrapper.output.logits.save()
        return logits


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
