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

``BlockDriver.forward`` is the "blocks" path of the partial forward (``Model.forward``; the
design is in ``tracekit.adapters.partial``): row joins, prefix keys/values from a recording,
padding to a shape grid, edits and captures over the real rows and columns only.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from tracekit.adapters.architectures import ArchAdapter, Site, _get
from tracekit.adapters.partial import (
    ForwardStats, Pass, Recording, Request, ShapePolicy, attention_kernels, collecting,
    gather_columns, pick_logits,
)

HookFn = Callable[[torch.Tensor], torch.Tensor]
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")  # layer_past: GPT-NeoX
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
        self.n_ctx = adapter.n_ctx(hf)

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
            handle = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
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
                handles.append(self.adapter.attach(self.hf, site, fn))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    # ---- the partial forward's "blocks" path ----------------------------------------------
    def forward(self, req: Request, policy: ShapePolicy, stats: ForwardStats | None = None) -> Pass:
        """Run ``req`` (validated by ``make_request``) block by block; see ``tracekit.adapters.partial``."""
        with attention_kernels(self.device):
            return _BlockPass(self, req, policy, stats).run()


class _BlockPass:
    """One partial forward over the blocks: rows padded to ``policy``'s grid, joined by layer."""

    def __init__(self, driver: BlockDriver, req: Request, policy: ShapePolicy, stats: ForwardStats | None):
        self.d, self.req, self.policy, self.stats = driver, req, policy, stats or collecting()
        self.n_rows, self.width = req.n_rows, req.width
        self.cols = min(policy.cols(self.width), max(self.width, driver.n_ctx)) if req.ids is not None \
            else policy.cols(self.width)
        starts = req.starts
        self.keys = policy.cols(int(starts.max())) if req.branch is not None and int(starts.max()) > 0 else 0
        self.live = (self.n_rows, self.width)  # rows and columns the hooks' functions see now
        self.captured: dict[Site, torch.Tensor] = {}

    # -- padding ----------------------------------------------------------------------------
    def _rows_for(self, n: int) -> int:
        return self.policy.rows(n)

    def _padded_meta(self, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Starts and sources for ``total`` rows: padding rows copy row 0's (any valid row will do)."""
        starts, source = self.req.starts, (self.req.branch.source if self.req.branch is not None else None)
        pad = total - self.n_rows
        starts = torch.cat([starts, starts[:1].expand(pad)])
        if source is not None:
            source = torch.cat([source, source[:1].expand(pad)])
        return starts, source

    def _positions(self, starts: torch.Tensor, like: torch.Tensor) -> Positions:
        """Position ids and masks for every (padded) row: columns start..start+cols-1, keys = the
        first ``self.keys`` recorded positions (those before the row's start) then the row's own."""
        device, cols, keys = like.device, self.cols, self.keys
        col = torch.arange(cols, device=device)
        causal = col[None, :] <= col[:, None]  # [cols, cols]
        limit = self.d.n_ctx - 1
        if bool((starts == starts[0]).all()):  # one mask for every row (broadcast)
            s = int(starts[0])
            seen = (torch.arange(keys, device=device) < s)[None].expand(cols, -1)
            allowed = torch.cat([seen, causal], dim=-1)[None, None]
            ids = (s + col).clamp(max=limit)[None]
        else:
            st = starts.to(device)
            seen = (torch.arange(keys, device=device)[None, None, :] < st[:, None, None]).expand(-1, cols, -1)
            allowed = torch.cat([seen, causal[None].expand(len(st), -1, -1)], dim=-1)[:, None]
            ids = (st[:, None] + col).clamp(max=limit)
        return self.d.make_positions(ids, allowed, like)

    @staticmethod
    def _rows_of(pos: Positions, n: int) -> Positions:
        if pos.ids.shape[0] == 1:
            return pos
        rotary = pos.rotary
        if rotary is not None:
            rotary = tuple(t[:n] for t in rotary) if isinstance(rotary, tuple) else rotary[:n]
        return Positions(pos.ids[:n], pos.mask[:n], rotary)

    def _prefix(self, layer: int, source: torch.Tensor, nb: int):
        if self.keys == 0:
            return None
        key, value = self.req.branch.recording.kv[layer]
        rows = source[:nb].to(key.device)
        if self.keys <= key.shape[2]:
            return key[rows, :, : self.keys], value[rows, :, : self.keys]
        at = torch.arange(self.keys, device=key.device).clamp(max=key.shape[2] - 1)  # masked anyway
        return key[rows][:, :, at], value[rows][:, :, at]

    # -- edits and captures over the real rows and columns ----------------------------------------
    def _apply(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        n, w = self.live
        fn = self.req.edits.get(site)
        if fn is not None:
            if x.shape[0] == n and x.shape[1] == w:
                x = fn(x)
            else:
                out = x.clone()
                out[:n, :w] = fn(x[:n, :w]).to(x.dtype)
                x = out
        if site in self.wanted:
            self.captured[site] = x[:n, :w]
        return x

    @contextlib.contextmanager
    def _hooks(self, sites):
        handles = []
        try:
            for site in sites:
                handles.append(self.d.adapter.attach(self.d.hf, site, lambda x, site=site: self._apply(site, x)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- the pass -------------------------------------------------------------------------------
    def run(self) -> Pass:
        req, d = self.req, self.d
        recorded = [Site("resid_pre", layer) for layer in range(req.stop_layer)] if req.record else []
        self.wanted = {*req.capture, *recorded}
        sites = {*req.edits, *self.wanted}
        embed_sites = [s for s in sites if s.kind == "embed"]
        layer_sites = [s for s in sites if s.kind != "embed"]
        hidden, rows_now = None, 0
        if req.ids is not None:
            total = self._rows_for(self.n_rows)
            ids = torch.zeros(total, self.cols, dtype=torch.long)
            ids[: self.n_rows, : self.width] = req.ids
            with self._hooks(embed_sites):
                hidden = d.block0_input(ids)
            rows_now = self.n_rows
        else:
            total = self._rows_for(self.n_rows)
        starts, source = self._padded_meta(total)
        like = hidden if hidden is not None else self._like()
        pos_all = self._positions(starts, like)
        entered = self._entered()
        kv = []
        with self._hooks(layer_sites):
            for layer in range(req.start_layer, req.stop_layer):
                n = entered[layer]
                if n > rows_now:
                    hidden = self._join(hidden, rows_now, n, layer)
                    rows_now = n
                nb = self._rows_for(n)
                if hidden.shape[0] < nb:
                    hidden = torch.cat([hidden, hidden.new_zeros(nb - hidden.shape[0], *hidden.shape[1:])])
                self.live = (n, self.width)
                if self.stats is not None:
                    self.stats.add(nb, self.cols, self.keys + self.cols, n * self.width)
                hidden, cache = d.block(layer, hidden, self._rows_of(pos_all, nb), self._prefix(layer, source, nb))
                if req.record:
                    kv.append((cache.seen[0][: self.n_rows, :, : self.width], cache.seen[1][: self.n_rows, :, : self.width]))
        hidden = hidden[: self.n_rows, : self.width]
        recording = None
        if req.record:
            recording = Recording(tuple(self.captured[s] for s in recorded), tuple(kv))
        captured = {s: self.captured[s] for s in req.capture}
        logits = pick_logits(req, hidden, d.norm, d.unembed)
        if self.stats is not None and logits is not None:
            self.stats.logits += logits.numel() // logits.shape[-1]
        return Pass(logits, hidden, captured, recording, "blocks")

    def _like(self) -> torch.Tensor:
        req = self.req
        if req.hidden is not None:
            return req.hidden
        return req.branch.recording.inputs[req.start_layer]

    def _entered(self) -> list[int]:
        n_layers = len(self.d.blocks)
        if self.req.branch is None:
            return [self.n_rows] * n_layers
        return self.req.branch.entered(n_layers)

    def _join(self, hidden: torch.Tensor | None, have: int, n: int, layer: int) -> torch.Tensor:
        """Rows have..n-1 enter at ``layer``: their state there, padded to the pass's columns."""
        req = self.req
        if req.hidden is not None:
            joining = req.hidden[have:n].to(self.d.device)
            if joining.shape[1] < self.cols:
                joining = torch.nn.functional.pad(joining, (0, 0, 0, self.cols - joining.shape[1]))
        else:
            branch = req.branch
            recorded = branch.recording.inputs[layer]
            joining = gather_columns(recorded, branch.source[have:n], branch.start[have:n], self.cols)
        if hidden is None:
            return joining
        return torch.cat([hidden[:have], joining.to(hidden.dtype)])
