"""Triton token log-probs (+ entropy), forward and backward, in one read of the logits each way.

Forward, one program per row: an online max / sum-of-exp over vocabulary blocks, the target logit read
directly, and optionally the entropy, accumulated relative to the running max so that logits of size 1e3
lose no digits. Outputs float32 log-prob, log-sum-exp (kept for the backward) and entropy per row.

Backward, one program per (row, vocabulary block): recompute p = exp(z - lse) and write
    d/dz_j = inv_t * (g_lp * ([j == t] - p_j) - g_h * p_j * (log p_j + H))
straight into a gradient of the logits' dtype: no [tokens x vocab] float32 temporary exists.

Logits may be any [..., V] with unit stride over V; rows are addressed through up to two leading strides,
so `logits[:, :-1]` (non-contiguous) needs no copy. The plain-PyTorch twin is `kernels.reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import register
from ..reference import rows_view
from .common import grad_buffer, logits_grad, online_lse_step, store_as

_NEG_BIG = tl.constexpr(-1.0e30)  # the running max starts here, not at -inf: exp(m_old - m_new) is never nan


@triton.jit
def _fwd_kernel(logits_ptr, tokens_ptr, logp_ptr, lse_ptr, ent_ptr, n_inner, stride_outer, stride_inner, V,
                inv_t, ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + (row // n_inner).to(tl.int64) * stride_outer + (row % n_inner).to(tl.int64) * stride_inner
    m = tl.full((), _NEG_BIG, tl.float32)   # running max of z = logits * inv_t
    s = tl.zeros((), tl.float32)            # sum exp(z - m)
    t = tl.zeros((), tl.float32)            # sum exp(z - m) * (z - m): the entropy's numerator
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m, s, t = online_lse_step(z, m, s, t, ENTROPY)
    tok = tl.load(tokens_ptr + row)
    # an id outside [0, V) reads nothing and gives NaN (the range check on the host is CPU-only)
    z_tok = tl.load(base + tok, mask=(tok >= 0) & (tok < V), other=float("nan")).to(tl.float32) * inv_t
    log_s = tl.log(s)
    tl.store(logp_ptr + row, z_tok - m - log_s)
    tl.store(lse_ptr + row, m + log_s)
    if ENTROPY:
        tl.store(ent_ptr + row, log_s - t / s)


@triton.jit
def _bwd_kernel(logits_ptr, grad_ptr, tokens_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_h_ptr, n_inner, stride_outer,
                stride_inner, g_stride_outer, g_stride_inner, V, inv_t, HAS_GLP: tl.constexpr,
                HAS_GH: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    outer, inner = (row // n_inner).to(tl.int64), (row % n_inner).to(tl.int64)
    valid = cols < V
    z = tl.load(logits_ptr + outer * stride_outer + inner * stride_inner + cols, mask=valid,
                other=float("-inf")).to(tl.float32) * inv_t
    logp = z - tl.load(lse_ptr + row)
    g = logits_grad(logp, cols == tl.load(tokens_ptr + row), row, g_lp_ptr, g_h_ptr, ent_ptr, inv_t, HAS_GLP, HAS_GH)
    store_as(grad_ptr + outer * g_stride_outer + inner * g_stride_inner + cols, g, valid, BF16_BITS)


def _block_v(vocab: int, element_size: int) -> int:
    # 16 KiB of logits per block: wide enough to stream at full bandwidth, few enough registers per thread.
    return min(triton.next_power_of_2(vocab), 16384 // element_size)


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, return_entropy):
        x = rows_view(logits)
        outer, inner, vocab = x.shape
        n = outer * inner
        flat_tok = tokens.reshape(-1).contiguous()
        logp = torch.empty(n, dtype=torch.float32, device=x.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if return_entropy else lse
        if n:
            _fwd_kernel[(n,)](x, flat_tok, logp, lse, ent, inner, x.stride(0), x.stride(1), vocab,
                              1.0 / temperature, ENTROPY=return_entropy,
                              BLOCK_V=_block_v(vocab, x.element_size()), num_warps=8)
        ctx.save_for_backward(x, flat_tok, lse, ent)
        ctx.temperature, ctx.return_entropy, ctx.shape = temperature, return_entropy, logits.shape
        shape = tokens.shape
        return (logp.view(shape), ent.view(shape)) if return_entropy else logp.view(shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        x, flat_tok, lse, ent = ctx.saved_tensors
        outer, inner, vocab = x.shape
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        has_h = ctx.return_entropy and grad_ent is not None
        g_lp = grad_logp.reshape(-1).float().contiguous() if grad_logp is not None else lse
        g_h = grad_ent.reshape(-1).float().contiguous() if has_h else lse
        n = outer * inner
        if n:
            block = _block_v(vocab, x.element_size())
            out, bf16 = grad_buffer(grad)
            _bwd_kernel[(n, triton.cdiv(vocab, block))](
                x, out, flat_tok, lse, ent, g_lp, g_h, inner, x.stride(0), x.stride(1), grad.stride(0),
                grad.stride(1), vocab, 1.0 / ctx.temperature, HAS_GLP=grad_logp is not None, HAS_GH=has_h,
                BF16_BITS=bf16,
                BLOCK_V=block, num_warps=8)
        return grad.view(ctx.shape), None, None, None


@register("token_logprobs", "triton")
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False):
    """Triton twin of kernels.reference.token_logprobs (same arguments, same float32 outputs)."""
    return _TritonTokenLogprobs.apply(logits, tokens, float(temperature), bool(return_entropy))
