"""The attention pattern as a site.

HF attention modules hand their query/key/value to an attention function looked up by
``config._attn_implementation`` (sdpa, eager, flash, ...), and fused kernels never materialise
the pattern. While a hook on a ``pattern`` site is attached, the model's implementation is
switched to ``tracekit_pattern``: eager attention written out (scores in float32, softmax, then
the pattern times the values) that passes each layer's pattern through the attached functions.
Without a ``pattern`` hook nothing changes. The site's tensor is [batch, query pos, heads, key
pos] (positions first, as every site; TransformerLens's ``hook_pattern`` is [batch, heads, query,
key]).
"""

from __future__ import annotations

import torch
from torch import nn

from tracekit.errors import TracekitError

NAME = "tracekit_pattern"
_HOOKS: dict[int, list] = {}  # id(attention module) -> functions of the pattern [B, Tq, H, Tk]
_SWITCHED: dict[int, tuple[object, str | None, int]] = {}  # id(config) -> (config, previous, count)
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux", "sinks")


def pattern_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise TracekitError(f"the pattern site does not support attention with {name} yet")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped keys/values: repeat them for every query head of their group
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if attention_mask is None:  # causal, the queries being the last Tq of the Tk positions
        tq, tk = scores.shape[-2:]
        rows = torch.arange(tq, device=scores.device)[:, None] + (tk - tq)
        attention_mask = torch.arange(tk, device=scores.device)[None, :] <= rows
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., : scores.shape[-1]].float()
    pattern = torch.softmax(scores, dim=-1).to(value.dtype)
    for fn in _HOOKS.get(id(module), ()):
        pattern = fn(pattern.transpose(1, 2)).transpose(1, 2).to(value.dtype)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


def _register() -> None:
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, pattern_attention)


class PatternHandle:
    """What ``attach`` returns for a pattern site: ``remove()`` detaches the function and, with the
    last one, restores the model's own attention implementation."""

    def __init__(self, model: nn.Module, attention: nn.Module, fn):
        _register()
        self.config, self.key, self.fn = model.config, id(attention), fn
        _HOOKS.setdefault(self.key, []).append(fn)
        config, previous, count = _SWITCHED.get(id(self.config), (self.config, self.config._attn_implementation, 0))
        _SWITCHED[id(self.config)] = (config, previous, count + 1)
        self.config._attn_implementation = NAME

    def remove(self) -> None:
        hooks = _HOOKS.get(self.key, [])
        if self.fn in hooks:
            hooks.remove(self.fn)
            if not hooks:
                del _HOOKS[self.key]
            config, previous, count = _SWITCHED.pop(id(self.config))
            if count > 1:
                _SWITCHED[id(self.config)] = (config, previous, count - 1)
            else:
                self.config._attn_implementation = previous
