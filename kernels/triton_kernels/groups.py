"""Triton group advantages (GRPO, Dr. GRPO, RLOO): one program per prompt's group of n scores, one read and
one write of each. The PyTorch twin is kernels.reference.group_advantages."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register

_MODES = {"grpo": 0, "drgrpo": 1, "rloo": 2}


@triton.jit
def _group_kernel(s_ptr, out_ptr, n, eps, MODE: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    s = tl.load(s_ptr + g * n + offs, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(s, axis=0) / n
    c = tl.where(valid, s - mean, 0.0)
    if MODE == 1:
        out = c
    elif MODE == 2:
        out = c * (n / (n - 1.0))
    else:
        den = tl.sqrt(tl.sum(c * c, axis=0) / (n - 1.0)) + eps
        out = tl.where(den == 0, 0.0, c / tl.where(den == 0, 1.0, den))  # eps = 0, equal scores: 0; NaN stays
    tl.store(out_ptr + g * n + offs, out, mask=valid)


@register("group_advantages", "triton")
def group_advantages(scores: torch.Tensor, n: int, mode: str, eps: float = 1e-6) -> torch.Tensor:
    if scores.dtype == torch.float64:  # float64 in, float64 out, as on every backend: the torch path is exact
        from ..reference import group_advantages as exact
        return exact(scores, n, mode, eps)
    s = scores.contiguous()
    out = torch.empty(s.shape, dtype=torch.float32, device=s.device)
    if s.numel():
        _group_kernel[(s.numel() // n,)](s, out, n, eps, MODE=_MODES[mode], BLOCK=triton.next_power_of_2(n))
    return out
