"""Masked statistics over valid tokens: mean, variance and whitening (PPO normalises advantages).

`x` and `mask` must have the same shape (a ValueError naming the argument otherwise): a mask that merely
broadcasts would silently average over the wrong positions. A position is valid where mask != 0 (a mask is
never a weight), as in every kernel.
"""
from __future__ import annotations

import torch

from .checks import check_masked


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    check_masked("x", x, mask)
    m = (mask != 0).to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (x, mask same shape). 0 if the mask is empty."""
    check_masked("x", x, mask)
    m = (mask != 0).to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the valid positions (Bessel-corrected when `unbiased` and more than one)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = (mask != 0).to(x.dtype).sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over valid positions; invalid positions are set to 0.

    With shift_mean=False the mean is added back (only the scale is normalised), as some PPO variants do.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask != 0, out, torch.zeros((), dtype=out.dtype))
