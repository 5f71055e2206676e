"""Masked statistics over valid tokens: mean, variance and whitening (PPO normalises advantages).

`x` and `mask` must have the same shape (a ValueError naming the argument otherwise): a mask that merely
broadcasts would silently average over the wrong positions. A position is valid where mask != 0 (a mask is
never a weight), as in every kernel.
"""
from __future__ import annotations

import torch

from .checks import check_masked


def _weights(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask checked once (shape, device, no NaN) and read as 1 where it is nonzero, in x's dtype."""
    check_masked("x", x, mask)
    return (mask != 0).to(x.dtype)


def _mean(x: torch.Tensor, m: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def _mean_var(x: torch.Tensor, m: torch.Tensor, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mean = _mean(x, m)
    var = _mean((x - mean) ** 2, m)
    n = m.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return mean, var


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = _weights(x, mask)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (x, mask same shape). 0 if the mask is empty."""
    return _mean(x, _weights(x, mask), dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the valid positions (Bessel-corrected when `unbiased` and more than one)."""
    return _mean_var(x, _weights(x, mask), unbiased)[1]


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over valid positions; invalid positions are set to 0.

    With shift_mean=False the mean is added back (only the scale is normalised), as some PPO variants do.
    """
    m = _weights(x, mask)
    mean, var = _mean_var(x, m, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m != 0, out, torch.zeros((), dtype=out.dtype))
