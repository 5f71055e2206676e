"""Token log-probs straight from hidden states, LM head fused in: the [N x V] logits never exist.

The vocabulary is walked in chunks of `chunk` columns. Forward, per chunk: logits_c = hidden @ W_c^T (+ b_c)
([N, chunk], one GEMM), folded into a running max / sum-of-exp / entropy numerator per row (an online
log-sum-exp across chunks, as in Cut Cross-Entropy), and the target logit picked up by the chunk that
holds it. Backward, per chunk: the chunk's logits are recomputed (not stored), turned into
    d/dz_j = inv_t * (g_lp * ([j == t] - p_j) - g_h * p_j * (log p_j + H)),   p_j = exp(z_j / T - lse)
and contracted at once: grad_W[chunk] = G_c^T @ hidden (each weight row is written by exactly one GEMM, so no
second [V, H] buffer accumulates anything), grad_hidden += G_c @ W_c (an [N, H] float32 accumulator).
Peak extra memory is a few [N, chunk] blocks instead of several [N, V] tensors.

`chunk_ops` lets a backend replace the per-chunk elementwise work (the Triton path does, see
kernels/triton_kernels/linear_logprobs.py); the GEMMs are torch's (cuBLAS / oneDNN) on every path.
"""
from __future__ import annotations

import torch

# Target size of one [N, chunk] float32 block.
CHUNK_BYTES = 16 * 2**20
_NEG_BIG = -1.0e30


def chunk_size(n: int, vocab: int, chunk: int | None = None) -> int:
    if chunk is not None:
        return max(1, min(chunk, vocab))
    cols = CHUNK_BYTES // (4 * max(n, 1))
    return max(128, min(vocab, (cols // 128) * 128 or 128))


class TorchChunkOps:
    """Per-chunk work in plain PyTorch (float32 math; float64 when the inputs are float64). Works in place on
    the chunk's logits, which the caller hands over and never reads again: one chunk-sized buffer, few passes."""

    @staticmethod
    def forward_update(z, v0, tokens, inv_t, state, entropy: bool):
        """Fold logits chunk z [N, c] (columns v0..v0+c) into state = (m, s, t, z_tok), all [N]."""
        m, s, t, z_tok = state
        z = z.to(m.dtype)                                # a fresh chunk: ours to modify in place
        if inv_t != 1.0:
            z.mul_(inv_t)
        local = tokens - v0
        hit = (local >= 0) & (local < z.shape[1])
        picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        z_tok.copy_(torch.where(hit, picked, z_tok))
        if not entropy:
            lse_c = torch.logsumexp(z, dim=1)  # the chunk's log-sum-exp, merged into the running (m, s)
            m_new = torch.maximum(m, lse_c)
            s.copy_(s * torch.exp(m - m_new) + torch.exp(lse_c - m_new))
            m.copy_(m_new)
            return
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = torch.exp(m - m_new)
        zs = z.sub_(m_new[:, None])                      # z - m_new, in place
        e = torch.exp(zs)
        t.copy_(alpha * (t + (m - m_new) * s) + torch.where(e > 0, e * zs, 0.0).sum(dim=1))
        s.copy_(s * alpha + e.sum(dim=1))
        m.copy_(m_new)

    @staticmethod
    def backward_grad(z, v0, tokens, inv_t, lse, ent, g_lp, g_h, out_dtype):
        """d loss / d logits for chunk z, in out_dtype (computed in place of z where the dtypes allow)."""
        z = z.to(lse.dtype)
        if inv_t != 1.0:
            z.mul_(inv_t)
        logp = z.sub_(lse[:, None])                      # log p, in place
        if g_h is not None:
            p = torch.exp(logp)
            # d(g_lp logp_t + g_h H)/dz = g_lp (onehot - p) - g_h p (log p + H)
            g = torch.where(p > 0, p * (logp + ent[:, None]), 0.0).mul_(-g_h[:, None])
            if g_lp is not None:
                g.sub_(p * g_lp[:, None])
        else:
            g = logp.exp_().mul_(-g_lp[:, None])          # -g_lp p, in place
        if g_lp is not None:
            local = tokens - v0
            hit = (local >= 0) & (local < g.shape[1])
            g.scatter_add_(1, local.clamp(0, g.shape[1] - 1)[:, None], torch.where(hit, g_lp, 0.0)[:, None])
        if inv_t != 1.0:
            g.mul_(inv_t)
        return g.to(out_dtype)


def _chunk_logits(hidden, weight, bias, v0, v1):
    z = hidden @ weight[v0:v1].t()
    if bias is not None:
        z = z + bias[v0:v1]
    return z


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, return_entropy, chunk, ops):
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        dev = hidden.device
        m = torch.full((n,), _NEG_BIG, dtype=acc, device=dev)
        s, t = (torch.zeros(n, dtype=acc, device=dev) for _ in range(2))
        z_tok = torch.full((n,), float("nan"), dtype=acc, device=dev)  # stays NaN for an id outside [0, V)
        inv_t = 1.0 / temperature
        c = chunk_size(n, vocab, chunk)
        for v0 in range(0, vocab, c):
            v1 = min(vocab, v0 + c)
            ops.forward_update(_chunk_logits(hidden, weight, bias, v0, v1), v0, tokens, inv_t, (m, s, t, z_tok),
                               return_entropy)
        log_s = torch.log(s)
        lse = m + log_s
        logp = z_tok - lse
        ent = log_s - t / s if return_entropy else None
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, ent if return_entropy else lse)
        ctx.inv_t, ctx.return_entropy, ctx.chunk, ctx.ops = inv_t, return_entropy, c, ops
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
        ops, inv_t, c = ctx.ops, ctx.inv_t, ctx.chunk
        vocab = weight.shape[0]
        g_lp = grad_logp.to(lse.dtype).contiguous() if grad_logp is not None else None
        g_h = grad_ent.to(lse.dtype).contiguous() if (ctx.return_entropy and grad_ent is not None) else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if (need_b and bias is not None) else None
        for v0 in range(0, vocab, c):
            v1 = min(vocab, v0 + c)
            z = _chunk_logits(hidden, weight, bias, v0, v1)
            g = ops.backward_grad(z, v0, tokens, inv_t, lse, ent, g_lp, g_h, weight.dtype)
            del z
            if need_w:
                torch.mm(g.t(), hidden, out=grad_w[v0:v1])
            if grad_b is not None:
                grad_b[v0:v1] = g.sum(dim=0, dtype=lse.dtype).to(bias.dtype)
            if need_h:  # a GEMM in the weights' dtype, summed over chunks in float32
                if g.dtype == grad_h.dtype:
                    grad_h.addmm_(g, weight[v0:v1])
                else:
                    grad_h += g @ weight[v0:v1]
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w, grad_b, None, None, None, None, None)


def linear_token_logprobs(hidden, weight, tokens, bias=None, temperature: float = 1.0, return_entropy: bool = False,
                          chunk: int | None = None, ops=TorchChunkOps):
    """log_softmax((hidden @ weight^T + bias) / temperature)[tokens] (and entropy) without [N, V] logits.

    hidden [N, H], weight [V, H], bias [V] or None, tokens [N] -> float32 [N] (float64 for float64 inputs).
    """
    return _LinearTokenLogprobs.apply(hidden, weight, bias, tokens.reshape(-1).long(), float(temperature),
                                      bool(return_entropy), chunk, ops)


def naive_linear_token_logprobs(hidden, weight, tokens, bias=None, temperature: float = 1.0,
                                return_entropy: bool = False):
    """The plain path: F.linear, a float32 log_softmax over the whole [N, V], gather."""
    from .reference import naive_token_logprobs

    logits = torch.nn.functional.linear(hidden, weight, bias)
    return naive_token_logprobs(logits, tokens, temperature, return_entropy)
