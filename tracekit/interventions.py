"""Small pure functions over hidden-state tensors [batch, pos, d].

Hook functions in tracing, zeroing and editing are compositions of these. None of them
modifies its input in place, so one captured clean state can be reused by many hooks.
"""

from __future__ import annotations

import torch


def restore(hidden: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Take ``clean`` where ``mask`` [batch, pos] is True, ``hidden`` elsewhere."""
    return torch.where(mask.unsqueeze(-1), clean.to(hidden.dtype), hidden)


def zero(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the vectors where ``mask`` [batch, pos] is True."""
    return hidden.masked_fill(mask.unsqueeze(-1), 0.0)
