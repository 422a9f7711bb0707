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


def add_to_span(hidden: torch.Tensor, start: int, delta: torch.Tensor) -> torch.Tensor:
    """Add ``delta`` [batch or 1, n, d] to positions start..start+n-1 of every row."""
    n = delta.shape[-2]
    out = hidden.clone()
    out[:, start:start + n] = out[:, start:start + n] + delta.to(hidden.dtype)
    return out


def add_at_positions(hidden: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Add one vector ``delta`` [d] (or [batch, d]) at one position per row (``positions`` [batch])."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    bump = torch.zeros_like(hidden)
    bump[rows, positions.to(hidden.device)] = delta.to(hidden.dtype)
    return hidden + bump


def position_mask(lengths_or_shape: tuple[int, int], rows, cols, device=None) -> torch.Tensor:
    """Boolean [batch, pos] mask with True at (rows[i], cols[i])."""
    mask = torch.zeros(lengths_or_shape, dtype=torch.bool, device=device)
    mask[torch.as_tensor(rows), torch.as_tensor(cols)] = True
    return mask
