"""Pieces every Triton kernel here shares: the online log-sum-exp step, the logits gradient, the bf16 store."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def online_lse_step(z, m, s, t, ENTROPY: tl.constexpr):
    """Fold a block z of (temperature-scaled) logits into a row's running max m, sum s = sum exp(z - m) and
    entropy numerator t = sum exp(z - m) (z - m), all kept relative to the running max so logits of size
    1e3 lose no digits. Returns the new (m, s, t)."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new)
    if ENTROPY:
        # sum_old exp(z - m_new)(z - m_new) = alpha * (t + (m - m_new) * s); 0 * -inf must not become nan
        t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(e > 0, z - m_new, 0.0), axis=0)
    s = s * alpha + tl.sum(e, axis=0)
    return m_new, s, t


@triton.jit
def logits_grad(logp, is_target, row, g_lp_ptr, g_h_ptr, ent_ptr, inv_t, HAS_GLP: tl.constexpr,
                HAS_GH: tl.constexpr):
    """d/dz_j of g_lp * logp_t + g_h * H for one row's log-probs logp_j = log p_j (z = logits / T), reading the
    row's upstream gradients (and entropy H) only when they exist:
    inv_t * (g_lp * ([j == t] - p_j) - g_h * p_j * (log p_j + H))."""
    p = tl.exp(logp)
    g = tl.zeros(logp.shape, tl.float32)
    if HAS_GLP:  # constexpr branches: only the taken one is compiled
        g = tl.load(g_lp_ptr + row) * (tl.where(is_target, 1.0, 0.0) - p)
    if HAS_GH:
        g -= tl.load(g_h_ptr + row) * tl.where(p > 0, p * (logp + tl.load(ent_ptr + row)), 0.0)
    return g * inv_t


@triton.jit
def store_as(dst, g, valid, BF16_BITS: tl.constexpr):
    """Store float32 g in dst's dtype. With BF16_BITS, dst is an int16 view of bfloat16 storage and g is
    rounded to nearest even by hand: exact on every backend (Triton's CPU interpreter truncates casts)."""
    if BF16_BITS:
        bits = g.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(dst, (bits >> 16).to(tl.int16), mask=valid)
    else:
        tl.store(dst, g.to(dst.dtype.element_ty), mask=valid)


def grad_buffer(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(what the kernel writes into, whether it is the bf16-bits view) for a gradient tensor t."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), True
    return t, False


def rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T] with unit stride over T (the row stride is passed to kernels, so row slices need no copy).
    A bool mask is viewed as uint8 (same bytes)."""
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    return x if x.stride(-1) == 1 else x.contiguous()
