"""Drive a HF causal LM's decoder blocks one at a time (the tracer's fast path).

A forward pass through ``model(...)`` always starts at the embeddings and covers every
position. To run only layers ``l0..L-1`` for only positions ``t..T-1`` we call the HF
blocks ourselves and hand each block's attention the keys/values of the positions
before ``t`` (taken from an earlier run) through a duck-typed cache object.

What differs per architecture is small and read from the modules themselves:
- block-0 input: taken from the model's own forward (a pre-hook on block 0 captures it
  and stops the pass), so GPT-2's learned position embeddings and dropout come for free;
- rotary position embeddings: the base model's ``rotary_emb`` module if it has one
  (GPT-J, Llama in transformers 5); GPT-2 has none (positions are in the hidden state);
- the keyword a block takes its cache under (``cache`` in transformers 5,
  ``past_key_values``/``past_key_value`` before), found from the block's signature;
- the attention mask format: boolean for ``sdpa``, additive float for ``eager``.
Other attention implementations (flash, flex) are not driven; ``unsupported_reason``
says why and callers fall back to whole forward passes.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from tracekit.adapters.architectures import ArchAdapter, Site, _get
from tracekit.adapters.backends import _apply_to_output

HookFn = Callable[[torch.Tensor], torch.Tensor]
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")
_MASKED_IMPLEMENTATIONS = ("sdpa", "eager")


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass once block 0's input is known."""


class PrefixKV:
    """Duck-typed KV cache for one block call.

    ``update`` is what HF attention calls with the new keys/values; we return them
    prefixed with ``prefix`` (the keys/values of earlier positions) and keep the new
    ones in ``seen`` so a run can record them for later calls.
    """

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.prefix = prefix
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key, value, layer_idx=None, *args, **kwargs):
        self.seen = (key, value)
        if self.prefix is None:
            return key, value
        old_key, old_value = self.prefix
        return torch.cat([old_key, key], dim=-2), torch.cat([old_value, value], dim=-2)


@dataclass(frozen=True)
class Positions:
    """What every block call for one slice of positions shares: ids, mask, rotary tables."""

    ids: torch.Tensor  # [1, P] absolute positions (contiguous, ending at the prompt's end)
    mask: torch.Tensor  # [1, 1, P, start + P]
    rotary: object  # whatever the base model's rotary module returns, or None


class BlockDriver:
    def __init__(self, hf: nn.Module, adapter: ArchAdapter):
        self.hf = hf
        self.adapter = adapter
        self.blocks = _get(hf, adapter.layers)
        self.base = adapter.base_model(hf)
        self.rotary = getattr(self.base, "rotary_emb", None)
        self.norm = _get(hf, adapter.final_norm)
        self.unembed = adapter.unembed_module(hf)
        params = inspect.signature(self.blocks[0].forward).parameters
        self.cache_keyword = next((k for k in _CACHE_KEYWORDS if k in params), None)
        self.implementation = getattr(hf.config, "_attn_implementation", None) or "eager"

    def unsupported_reason(self) -> str | None:
        if self.cache_keyword is None:
            return "its blocks take no KV cache argument this driver knows"
        if self.implementation not in _MASKED_IMPLEMENTATIONS:
            return f"attention implementation {self.implementation!r} (need sdpa or eager)"
        return None

    # ---- pieces of a forward pass ------------------------------------------------------
    def block0_input(self, input_ids: torch.Tensor, edits: Mapping[Site, HookFn] | None = None) -> torch.Tensor:
        """The hidden state entering block 0, with ``edits`` (e.g. embedding noise) applied."""
        captured = {}

        def grab(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        with self.hooks(edits or {}):
            handle = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                self.base(input_ids=input_ids.to(self.device), use_cache=False)
            except _Stop:
                pass
            finally:
                handle.remove()
        return captured["h"]

    def positions(self, start: int, end: int, like: torch.Tensor) -> Positions:
        """Positions start..end-1 attending to keys 0..end-1 (keys < start come as a prefix)."""
        ids = torch.arange(start, end, device=like.device)[None]
        keys = torch.arange(end, device=like.device)
        return self.make_positions(ids, (keys[None, :] <= ids[0][:, None])[None, None], like)

    def make_positions(self, ids: torch.Tensor, allowed: torch.Tensor, like: torch.Tensor) -> Positions:
        """``Positions`` for position ids [B, P] and a boolean may-attend mask [B, 1, P, keys], in the
        form this attention implementation takes (eager wants an additive float mask)."""
        if self.implementation == "eager":
            mask = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
            mask = mask.masked_fill(~allowed, torch.finfo(like.dtype).min)
        else:
            mask = allowed
        rotary = self.rotary(like, position_ids=ids) if self.rotary is not None else None
        return Positions(ids, mask, rotary)

    def block(self, layer: int, hidden: torch.Tensor, pos: Positions,
              prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, PrefixKV]:
        """Run block ``layer`` on ``hidden`` [B, P, d]; returns its output and the cache it saw."""
        cache = PrefixKV(prefix)
        kwargs = {"attention_mask": pos.mask, "position_ids": pos.ids, "use_cache": True, self.cache_keyword: cache}
        if pos.rotary is not None:
            kwargs["position_embeddings"] = pos.rotary
        out = self.blocks[layer](hidden, **kwargs)
        return (out[0] if isinstance(out, tuple) else out), cache

    def last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding at the last position only: [B, vocab]."""
        return self.unembed(self.norm(hidden[:, -1]))

    # ---- hooks -------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, edits: Mapping[Site, HookFn]):
        """Apply ``edits`` (site -> fn of the site's output) to every block call inside."""
        handles = []
        try:
            for site, fn in edits.items():
                if site.kind == "mlp_in":
                    raise ValueError("BlockDriver edits module outputs only")
                module = self.adapter.module(self.hf, site)
                handles.append(module.register_forward_hook(
                    lambda m, a, out, fn=fn: _apply_to_output(out, fn)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device
