"""Public entry points: validate once, then dispatch to a backend. Signatures are a contract."""
from __future__ import annotations

import torch

from . import checks, linear_logprobs_ref, reference
from .dispatch import register, resolve

# The torch reference is always registered.
register("token_logprobs", "torch")(reference.token_logprobs)
register("kl_penalty", "torch")(reference.kl_penalty)
register("shape_rewards", "torch")(reference.shape_rewards)
register("gae", "torch")(reference.gae)
register("linear_token_logprobs", "torch")(linear_logprobs_ref.linear_token_logprobs)
register("group_advantages", "torch")(reference.group_advantages)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, backend: str = "auto"):
    """Log-probability of each target token under softmax(logits / temperature).

    logits [..., V] float32/bfloat16/float16, tokens [...] integer ids in [0, V).
    Returns float32 [...] log-probs, or (log-probs, entropies) with return_entropy=True; differentiable
    with respect to `logits`. No backend builds a float32 copy of the whole logits tensor.
    """
    checks.check_token_logprobs_args(logits, tokens, temperature)
    _, fn = resolve("token_logprobs", backend, logits.device.type)
    return fn(logits, tokens, float(temperature), bool(return_entropy))


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1",
               backend: str = "auto") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate, same shape as the inputs.

    With r = logprobs - ref_logprobs: k1 = r, k2 = r^2 / 2, k3 = exp(-r) - 1 + r (Schulman's estimators).
    """
    checks.check_kl_args(logprobs, ref_logprobs, estimator)
    _, fn = resolve("kl_penalty", backend, logprobs.device.type)
    return fn(logprobs, ref_logprobs, estimator)


def shape_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  mask: torch.Tensor, *, kl_coef: float, estimator: str = "k1", backend: str = "auto",
                  out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Per-token PPO rewards: -kl_coef * KL, plus scores[b] at the last valid position of row b.

    scores [B]; logprobs, ref_logprobs, mask [B, T] -> (rewards [B, T], kl [B, T]) float32, with
    kl = estimator * mask. Rows without a valid token get zeros. out=(rewards, kl): contiguous [B, T]
    float32 tensors (float64 for float64 inputs) to write into and return, instead of fresh ones (on the CPU
    fresh memory costs the OS a page fault and a zeroed page per 2 MiB-4 KiB, more than the op itself).
    """
    checks.check_shape_rewards_args(scores, logprobs, ref_logprobs, mask, kl_coef, estimator)
    if out is not None:
        checks.check_out_pair(out, logprobs, {"scores": scores, "logprobs": logprobs, "ref_logprobs": ref_logprobs,
                                              "mask": mask})
    _, fn = resolve("shape_rewards", backend, logprobs.device.type)
    return fn(scores, logprobs, ref_logprobs, mask, float(kl_coef), estimator, out=out)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float,
        backend: str = "auto", whiten: bool = False):
    """Generalised advantage estimation over valid positions; rewards, values, mask [B, T].

    Returns (advantages, returns) [B, T], zero where mask is 0. Masks may be right-padded, left-padded or
    have holes: masked positions are skipped by the recursion (see kernels.reference.gae). whiten=True
    also whitens the advantages over the valid tokens (a second small call; returns stay unwhitened).
    """
    checks.check_gae_args(rewards, values, mask, gamma, lam)
    _, fn = resolve("gae", backend, rewards.device.type)
    adv, ret = fn(rewards, values, mask, float(gamma), float(lam))
    if whiten:
        from .stats import whiten as _whiten

        adv = _whiten(adv, mask)
    return adv, ret


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False,
                          backend: str = "auto"):
    """Token log-probs from hidden states through the LM head, never holding the [N, V] logits.

    hidden [N, H], weight [V, H] (the LM head; same dtype), tokens [N], bias [V] or None.
    Returns float32 [N] log_softmax((hidden @ weight^T + bias) / temperature)[tokens], or (log-probs,
    entropies); differentiable with respect to hidden, weight and bias.
    """
    checks.check_linear_token_logprobs_args(hidden, weight, tokens, bias, temperature)
    _, fn = resolve("linear_token_logprobs", backend, hidden.device.type)
    return fn(hidden, weight, tokens, bias, float(temperature), bool(return_entropy))


def group_advantages(scores: torch.Tensor, n: int, *, mode: str, eps: float = 1e-6,
                     backend: str = "auto") -> torch.Tensor:
    """Critic-free advantages: each of B = prompts x n scores (prompt-major) against its own prompt's group.

    mode "grpo" ((s - mean) / (std + eps), Bessel-corrected std), "drgrpo" (s - mean) or "rloo" (s - mean of
    the other n - 1). scores [B] -> [B] float32 (float64 for float64). n >= 2; a group whose scores are all
    equal gets zeros (never NaN). See kernels.reference.group_advantages.
    """
    checks.check_group_args(scores, n, mode, eps)
    _, fn = resolve("group_advantages", backend, scores.device.type)
    return fn(scores, n, mode, float(eps))
