"""Triton per-chunk work for the fused LM-head log-probs (the GEMMs stay torch's: cuBLAS on GPUs).

Forward: one program per row folds its [chunk] logits into the row's running (max, sum-of-exp, entropy
numerator, target logit), one read of the chunk. Backward: one program per (row, block) turns the chunk's
logits into the gradient in place of a buffer of the weights' dtype (bfloat16 rounded to nearest even by
hand, as in token_logprobs.py). The chunked driver is kernels/linear_logprobs_ref.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register
from ..linear_logprobs_ref import linear_token_logprobs as _chunked
from .common import grad_buffer, logits_grad, online_lse_step, store_as


@triton.jit
def _fold_kernel(z_ptr, tok_ptr, m_ptr, s_ptr, t_ptr, zt_ptr, C, stride_z, v0, inv_t, ENTROPY: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    m_old = tl.load(m_ptr + row)
    m = m_old
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    offs = tl.arange(0, BLOCK)
    for c0 in range(0, C, BLOCK):
        cols = c0 + offs
        z = tl.load(base + cols, mask=cols < C, other=float("-inf")).to(tl.float32) * inv_t
        m, s, t = online_lse_step(z, m, s, t, ENTROPY)
    # merge this chunk's (m, s, t) with the row's running state (m_old, s_old, t_old)
    s_old = tl.load(s_ptr + row)
    t_old = tl.load(t_ptr + row)
    a_old = tl.exp(m_old - m)
    tl.store(s_ptr + row, s_old * a_old + s)
    if ENTROPY:
        tl.store(t_ptr + row, a_old * (t_old + (m_old - m) * s_old) + t)
    tl.store(m_ptr + row, m)
    local = tl.load(tok_ptr + row) - v0
    if (local >= 0) & (local < C):
        tl.store(zt_ptr + row, tl.load(base + local).to(tl.float32) * inv_t)


@triton.jit
def _grad_kernel(z_ptr, g_ptr, tok_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, C, stride_z, stride_g, v0, inv_t,
                 HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < C
    z = tl.load(z_ptr + row.to(tl.int64) * stride_z + cols, mask=valid, other=float("-inf")).to(tl.float32)
    logp = z * inv_t - tl.load(lse_ptr + row)
    g = logits_grad(logp, cols == tl.load(tok_ptr + row) - v0, row, glp_ptr, gh_ptr, ent_ptr, inv_t, HAS_GLP, HAS_GH)
    store_as(g_ptr + row.to(tl.int64) * stride_g + cols, g, valid, BF16_BITS)


def _block(c: int, element_size: int) -> int:
    return min(triton.next_power_of_2(c), 16384 // element_size)


class TritonChunkOps:
    @staticmethod
    def forward_update(z, v0, tokens, inv_t, state, entropy: bool):
        m, s, t, z_tok = state
        if m.dtype != torch.float32:  # float64 inputs: the torch path is exact there
            from ..linear_logprobs_ref import TorchChunkOps
            return TorchChunkOps.forward_update(z, v0, tokens, inv_t, state, entropy)
        n, c = z.shape
        _fold_kernel[(n,)](z, tokens, m, s, t, z_tok, c, z.stride(0), v0, inv_t, ENTROPY=entropy,
                           BLOCK=_block(c, z.element_size()), num_warps=8)

    @staticmethod
    def backward_grad(z, v0, tokens, inv_t, lse, ent, g_lp, g_h, out_dtype):
        if lse.dtype != torch.float32:
            from ..linear_logprobs_ref import TorchChunkOps
            return TorchChunkOps.backward_grad(z, v0, tokens, inv_t, lse, ent, g_lp, g_h, out_dtype)
        n, c = z.shape
        out = torch.empty((n, c), dtype=out_dtype, device=z.device)
        buf, bf16 = grad_buffer(out)
        block = _block(c, z.element_size())
        _grad_kernel[(n, triton.cdiv(c, block))](
            z, buf, tokens, lse, ent, g_lp if g_lp is not None else lse,
            g_h if g_h is not None else lse, c, z.stride(0), out.stride(0), v0, inv_t, HAS_GLP=g_lp is not None,
            HAS_GH=g_h is not None, BF16_BITS=bf16, BLOCK=block, num_warps=8)
        return out


@register("linear_token_logprobs", "triton")
def linear_token_logprobs(hidden, weight, tokens, bias=None, temperature: float = 1.0, return_entropy: bool = False,
                          chunk: int | None = None):
    return _chunked(hidden, weight, tokens, bias, temperature, return_entropy, chunk, ops=TritonChunkOps)
