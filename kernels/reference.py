"""Plain-PyTorch implementations of the hot-path ops: the CPU path and the reference for every kernel.

These are exact (float32 accumulation, float64 when given float64) and memory-safe: `token_logprobs`
walks the logits in row blocks so it never holds a float32 copy of the whole [tokens x vocab] tensor,
forward or backward. Inputs are validated by `kernels.checks` before they get here.
"""
from __future__ import annotations

from typing import Iterator

import torch

# Rows per block are chosen so one float32 block is about this many elements (8 MiB): large enough to
# amortise per-op overhead, small enough to stay in the last-level cache on a CPU.
_BLOCK_ELEMENTS = 1 << 21


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (for references); everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_blocks(logits: torch.Tensor, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first flat row, [rows, V] view) blocks of `logits` [..., V] without copying it.

    A non-contiguous tensor (e.g. `logits[:, :-1]`) cannot always be flattened to [N, V] as a view; then
    we recurse over its leading dimension, whose slices are views.
    """
    vocab = logits.shape[-1]
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(vocab, 1))
    if logits.dim() == 1:
        yield start, logits.unsqueeze(0)
        return
    try:
        flat = logits.view(-1, vocab)
    except RuntimeError:
        flat = None
    if flat is not None:
        for r0 in range(0, flat.shape[0], rows_per_block):
            yield start + r0, flat[r0 : r0 + rows_per_block]
        return
    inner = logits[0].numel() // vocab
    for i in range(logits.shape[0]):
        yield from _row_blocks(logits[i], start + i * inner)


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x [..., V] as an [outer, inner, V] view with unit stride over V, for kernels that address rows through
    two strides (so `logits[:, :-1]` needs no copy); a copy only when no such view exists."""
    if x.dim() == 1:
        x = x.view(1, 1, -1)
    elif x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() > 3:
        try:
            x = x.view(-1, x.shape[-2], x.shape[-1])
        except RuntimeError:
            x = x.reshape(-1, x.shape[-2], x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _block_log_softmax(block: torch.Tensor, inv_t: float, dtype: torch.dtype) -> torch.Tensor:
    """log_softmax of one [rows, V] block in `dtype` (ATen's fused kernel; the max shift is inside it, so
    logits of size 1e3 keep their digits)."""
    z = block.to(dtype)
    if inv_t != 1.0:
        z = z * inv_t
    return torch.log_softmax(z, dim=-1)


def _entropy(lsm: torch.Tensor) -> torch.Tensor:
    p = lsm.exp()
    # p * log p is 0 * -inf = nan where a logit is -inf; those entries contribute nothing (a NaN stays NaN).
    return -torch.where(p == 0, torch.zeros((), dtype=lsm.dtype), p * lsm).sum(dim=-1)


def _infinite_rows(logits, flat_tok, logp, ent) -> None:
    """The limits where a row holds +inf (log_softmax gives NaN there): all the mass on the row's k infinite
    logits, so log-prob -log k for those, -inf for the others, entropy log k. Only rows that came out NaN are
    looked at again, so ordinary inputs pay one isnan over the outputs."""
    bad = torch.isnan(logp)
    if not bad.any():
        return
    rows = bad.nonzero().squeeze(1)
    z = logits.reshape(-1, logits.shape[-1])[rows]
    inf = torch.isposinf(z)
    k = inf.sum(1)
    has = k > 0
    hit = inf.gather(1, flat_tok[rows, None]).squeeze(1)
    limit = torch.where(hit, -torch.log(k.to(logp.dtype)), torch.full_like(logp[rows], float("-inf")))
    logp[rows] = torch.where(has, limit, logp[rows])
    if ent is not None:
        ent[rows] = torch.where(has, torch.log(k.to(ent.dtype)), ent[rows])


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, return_entropy):
        dtype = compute_dtype(logits)
        n = tokens.numel()
        flat_tok = tokens.reshape(-1).long()
        logp = torch.empty(n, dtype=dtype, device=logits.device)
        ent = torch.empty(n, dtype=dtype, device=logits.device) if return_entropy else None
        inv_t = 1.0 / temperature
        for r0, block in _row_blocks(logits):
            r1 = r0 + block.shape[0]
            lsm = _block_log_softmax(block, inv_t, dtype)  # one block-sized temporary at a time
            logp[r0:r1] = lsm.gather(1, flat_tok[r0:r1, None]).squeeze(1)
            if return_entropy:
                ent[r0:r1] = _entropy(lsm)
        _infinite_rows(logits, flat_tok, logp, ent)
        ctx.save_for_backward(logits, flat_tok, ent if return_entropy else logp)
        ctx.temperature, ctx.return_entropy = temperature, return_entropy
        shape = tokens.shape
        if return_entropy:
            return logp.view(shape), ent.view(shape)
        return logp.view(shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        logits, flat_tok, ent = ctx.saved_tensors
        dtype = compute_dtype(logits)
        inv_t = 1.0 / ctx.temperature
        g_lp = grad_logp.reshape(-1).to(dtype) if grad_logp is not None else None
        g_h = grad_ent.reshape(-1).to(dtype) if (ctx.return_entropy and grad_ent is not None) else None
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # contiguous
        flat_grad = grad.view(-1, logits.shape[-1])
        for r0, block in _row_blocks(logits):
            r1 = r0 + block.shape[0]
            lsm = _block_log_softmax(block, inv_t, dtype)  # recomputed, not stored: no [N, V] float32
            p = lsm.exp()
            g = torch.zeros_like(lsm)
            if g_lp is not None:
                # d logp_t / dz_j = [j == t] - p_j
                g -= p * g_lp[r0:r1, None]
                g.scatter_add_(1, flat_tok[r0:r1, None], g_lp[r0:r1, None])
            if g_h is not None:
                # dH / dz_j = -p_j (log p_j + H); zero where p_j == 0 (logit -inf)
                term = torch.where(p > 0, p * (lsm + ent[r0:r1, None]), torch.zeros((), dtype=dtype))
                g -= term * g_h[r0:r1, None]
            if inv_t != 1.0:
                g *= inv_t
            flat_grad[r0:r1].copy_(g)
        return grad, None, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False):
    """log_softmax(logits / temperature)[tokens] (and entropy), float32, blockwise; see kernels.token_logprobs."""
    return _TokenLogprobs.apply(logits, tokens, float(temperature), bool(return_entropy))


def naive_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                         return_entropy: bool = False):
    """What most trainers write: a full float32 log_softmax. The baseline for benchmarks and tests."""
    logp_all = torch.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # Mask log p before the product, not after: where(p > 0, p * logp, 0) back-propagates 0 * -inf = nan.
    ent = -(p * torch.where(p > 0, logp_all, torch.zeros((), dtype=p.dtype))).sum(-1)
    return logp, ent


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate from r = logprobs - ref_logprobs: k1 = r, k2 = r^2/2, k3 = exp(-r) - 1 + r."""
    r = logprobs - ref_logprobs
    if estimator == "k1":
        return r
    if estimator == "k2":
        return 0.5 * r * r
    return torch.expm1(-r) + r


def last_valid_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For mask [B, T]: (index of the last position with mask 1 in each row, whether the row has one)."""
    m = mask.bool()
    t = m.shape[1]
    idx = (t - 1) - m.flip(1).int().argmax(dim=1)
    return idx, m.any(dim=1)


def shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float, estimator: str = "k1", out=None):
    """InstructGPT's per-token reward: -kl_coef * KL everywhere, plus the RM score at the last valid token.

    scores [B], logprobs/ref_logprobs/mask [B, T] -> (rewards [B, T], kl [B, T]), zero where mask is 0;
    written into out = (rewards, kl) when given.
    """
    dtype = compute_dtype(logprobs)
    m = mask.bool()
    kl = torch.where(m, kl_penalty(logprobs.to(dtype), ref_logprobs.to(dtype), estimator), 0.0).to(dtype)
    rewards = -kl_coef * kl
    idx, has = last_valid_index(m)
    add = torch.where(has, scores.to(dtype), torch.zeros((), dtype=dtype))
    rewards.scatter_add_(1, idx[:, None], add[:, None])
    return into(out, (rewards, kl))


def into(out, results: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """results copied into out (for backends that compute into fresh tensors), or results when out is None."""
    if out is None:
        return results
    for dst, src in zip(out, results):
        dst.copy_(src)
    return tuple(out)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Masked generalised advantage estimation, rewards/values/mask [B, T] -> (advantages, returns).

    Reverse recursion over valid positions only: delta_t = r_t + gamma V_next - V_t,
    A_t = delta_t + gamma lam A_next. Masked positions pass V_next and A_next through untouched (so holes
    and left padding are skipped) and get 0 in both outputs. Values past the last valid token are 0.
    """
    dtype = compute_dtype(rewards)
    r, v, m = rewards.to(dtype), values.to(dtype), mask.bool()
    b, t = r.shape
    adv = torch.zeros(b, t, dtype=dtype, device=r.device)
    next_v = torch.zeros(b, dtype=dtype, device=r.device)
    next_a = torch.zeros(b, dtype=dtype, device=r.device)
    for i in range(t - 1, -1, -1):
        mi = m[:, i]
        delta = r[:, i] + gamma * next_v - v[:, i]
        a = delta + gamma * lam * next_a
        next_a = torch.where(mi, a, next_a)
        next_v = torch.where(mi, v[:, i], next_v)
        adv[:, i] = torch.where(mi, a, torch.zeros((), dtype=dtype))
    returns = torch.where(m, adv + v, torch.zeros((), dtype=dtype))
    return adv, returns


GROUP_MODES = ("grpo", "drgrpo", "rloo")


def group_advantages(scores: torch.Tensor, n: int, mode: str, eps: float = 1e-6) -> torch.Tensor:
    """Critic-free advantages of B = prompts x n scores, prompt-major (each prompt's n samples adjacent, as
    generate(n=...) returns them), each against its own group. [B] -> [B] float32 (float64 for float64).

    grpo:   (s - mean) / (std + eps), std with Bessel's correction (DeepSeekMath; TRL and verl alike)
    drgrpo: s - mean (Dr. GRPO: no division by the std)
    rloo:   s - mean of the other n - 1 = n / (n - 1) * (s - mean) (Ahmadian et al.'s leave-one-out)
    A group whose scores are all equal gets zeros; a group holding a NaN or infinite score gets non-finite
    advantages (never zeros: a broken score stays visible), the same on every backend.
    """
    dtype = compute_dtype(scores)
    g = scores.to(dtype).view(-1, n)
    centred = g - g.mean(dim=1, keepdim=True)
    if mode == "drgrpo":
        out = centred
    elif mode == "rloo":
        out = centred * (n / (n - 1))
    else:
        den = (centred.square().sum(dim=1, keepdim=True) / (n - 1)).sqrt() + eps
        # den == 0 only for equal scores with eps 0; NaN (from a non-finite score) falls through to the division
        out = torch.where(den == 0, torch.zeros((), dtype=dtype), centred / den.clamp(min=torch.finfo(dtype).tiny))
    return out.reshape(-1)
