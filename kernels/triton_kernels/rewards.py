"""Triton KL penalty and KL-shaped rewards: each one kernel, one read of its inputs.

shape_rewards, one program per row: kl = estimator(logprobs - ref_logprobs) * mask, rewards = -kl_coef * kl,
plus scores[b] at the row's last valid position. Rows up to `_SINGLE_BLOCK` tokens are handled in one
block (the last valid index is a max-reduction over the same registers); longer rows first scan the mask
(1 byte per token) for the last valid index, then stream the rest. The PyTorch twin is kernels.reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register
from .common import rows

_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}
_SINGLE_BLOCK = 8192


@triton.jit
def _estimate(r, EST: tl.constexpr):
    if EST == 1:
        return r
    elif EST == 2:
        return 0.5 * r * r
    else:
        # exp(-r) - 1 + r. For |r| < 0.5 its Taylor series to r^10 (truncation < 1e-10 relative): the direct
        # form cancels there (at r = 1e-3 it would keep one digit in float32). Beyond, the value is > 0.1.
        p = 1.0 / 3628800.0
        p = 1.0 / 362880.0 - r * p
        p = 1.0 / 40320.0 - r * p
        p = 1.0 / 5040.0 - r * p
        p = 1.0 / 720.0 - r * p
        p = 1.0 / 120.0 - r * p
        p = 1.0 / 24.0 - r * p
        p = 1.0 / 6.0 - r * p
        p = 0.5 - r * p
        return tl.where(tl.abs(r) < 0.5, r * r * p, tl.exp(-r) - 1.0 + r)


@triton.jit
def _kl_kernel(lp_ptr, ref_ptr, out_ptr, n, EST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    r = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(tl.float32) - \
        tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _estimate(r, EST).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _shape_kernel(scores_ptr, lp_ptr, ref_ptr, mask_ptr, rew_ptr, kl_ptr, T, s_lp, s_ref, s_mask, kl_coef,
                  EST: tl.constexpr, BLOCK_T: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    score = tl.load(scores_ptr + row).to(tl.float32)
    if SINGLE:
        valid = offs < T
        m = tl.load(mask_ptr + row * s_mask + offs, mask=valid, other=0) != 0
        r = tl.load(lp_ptr + row * s_lp + offs, mask=valid, other=0.0).to(tl.float32) - \
            tl.load(ref_ptr + row * s_ref + offs, mask=valid, other=0.0).to(tl.float32)
        kl = tl.where(m, _estimate(r, EST), 0.0)
        last = tl.max(tl.where(m, offs, -1), axis=0)
        rew = -kl_coef * kl + tl.where(offs == last, score, 0.0)
        tl.store(kl_ptr + row * T + offs, kl, mask=valid)
        tl.store(rew_ptr + row * T + offs, rew, mask=valid)
    else:
        last = tl.full((), -1, tl.int32)
        for t0 in range(0, T, BLOCK_T):
            cols = t0 + offs
            m = tl.load(mask_ptr + row * s_mask + cols, mask=cols < T, other=0) != 0
            last = tl.maximum(last, tl.max(tl.where(m, cols, -1), axis=0))
        for t0 in range(0, T, BLOCK_T):
            cols = t0 + offs
            valid = cols < T
            m = tl.load(mask_ptr + row * s_mask + cols, mask=valid, other=0) != 0
            r = tl.load(lp_ptr + row * s_lp + cols, mask=valid, other=0.0).to(tl.float32) - \
                tl.load(ref_ptr + row * s_ref + cols, mask=valid, other=0.0).to(tl.float32)
            kl = tl.where(m, _estimate(r, EST), 0.0)
            rew = -kl_coef * kl + tl.where(cols == last, score, 0.0)
            tl.store(kl_ptr + row * T + cols, kl, mask=valid)
            tl.store(rew_ptr + row * T + cols, rew, mask=valid)


@register("kl_penalty", "triton")
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    lp, ref = logprobs.contiguous(), ref_logprobs.contiguous()
    out_dtype = torch.promote_types(lp.dtype, ref.dtype)
    out = torch.empty(lp.shape, dtype=out_dtype, device=lp.device)
    n = lp.numel()
    if n:
        block = 1024
        _kl_kernel[(triton.cdiv(n, block),)](lp, ref, out, n, EST=_ESTIMATORS[estimator], BLOCK=block)
    return out


@register("shape_rewards", "triton")
def shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float, estimator: str = "k1", out=None):
    if logprobs.dtype == torch.float64:  # float64 in, float64 out, as on every backend: the torch path is exact
        from ..reference import shape_rewards as exact
        return exact(scores, logprobs, ref_logprobs, mask, kl_coef, estimator, out=out)
    lp, ref = rows(logprobs), rows(ref_logprobs)
    m = rows(mask)
    b, t = lp.shape
    if out is None:
        rewards = torch.empty(b, t, dtype=torch.float32, device=lp.device)
        kl = torch.empty_like(rewards)
    else:  # checked by kernels.checks: contiguous [B, T] float32
        rewards, kl = out
    if b and t:
        single = t <= _SINGLE_BLOCK
        block = triton.next_power_of_2(t) if single else 2048
        _shape_kernel[(b,)](scores.contiguous(), lp, ref, m, rewards, kl, t, lp.stride(0), ref.stride(0),
                            m.stride(0), float(kl_coef), EST=_ESTIMATORS[estimator], BLOCK_T=block,
                            SINGLE=single, num_warps=4 if block <= 2048 else 8)
    return rewards, kl
