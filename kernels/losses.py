"""The three losses of InstructGPT's recipe as pure functions: clipped policy, clipped value, K-way ranking."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_loss_args
from .stats import masked_mean


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float = 0.2,
                is_weights: torch.Tensor | None = None):
    """PPO's clipped surrogate, all [B, T]. Returns (loss, stats).

    ratio = exp(logprobs - old_logprobs); loss = mean over valid tokens of
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)). `is_weights` (optional, [B, T], no grad) multiplies
    each token's loss: the truncated importance-sampling correction for rollouts whose log-probs came
    from another engine.
    """
    check_loss_args(mask, "clip_eps", clip_eps, logprobs=logprobs, old_logprobs=old_logprobs,
                    advantages=advantages, is_weights=is_weights)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            # k3 estimate of KL(old || new), as in the PPO literature's "approx_kl"
            "approx_kl": masked_mean(torch.expm1(-log_ratio) + log_ratio, mask).item(),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_eps: float = 0.2):
    """Clipped value loss, all [B, T]: 0.5 * mean over valid tokens of max((v - R)^2, (v_clipped - R)^2),
    where v_clipped = old_v + clip(v - old_v, -eps, eps). Returns (loss, stats)."""
    check_loss_args(mask, "clip_eps", clip_eps, values=values, old_values=old_values, returns=returns)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask).item()}
    return loss, stats


def ranking_loss(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor):
    """InstructGPT's reward-model loss over all K-choose-2 pairs of each prompt.

    scores [B, K] reward of each response; ranks [B, K] int, 0 = best (a labeler's ranking); valid [B, K]
    bool marks the responses that exist (K varies per prompt, 4..9 in the paper). For each prompt,
    loss = -1/C(K,2) * sum over pairs (w better than l) of log sigmoid(r_w - r_l); the batch loss is the mean
    over prompts, so every prompt counts once however large its K (the paper's fix for overfitting).
    Returns (loss, accuracy) where accuracy is the fraction of pairs ordered correctly.
    """
    if scores.shape != ranks.shape or scores.shape != valid.shape or scores.dim() != 2:
        raise ValueError(
            f"`scores`, `ranks` and `valid` must all have shape [B, K]; got {tuple(scores.shape)}, "
            f"{tuple(ranks.shape)}, {tuple(valid.shape)}"
        )
    v = valid.bool()
    diff = scores[:, :, None] - scores[:, None, :]  # [B, K, K]: r_i - r_j
    better = (ranks[:, :, None] < ranks[:, None, :]) & v[:, :, None] & v[:, None, :]
    pair_loss = -F.logsigmoid(diff) * better
    n_pairs = better.sum(dim=(1, 2))
    has = n_pairs > 0
    per_prompt = pair_loss.sum(dim=(1, 2)) / n_pairs.clamp(min=1)
    loss = per_prompt[has].mean() if has.any() else scores.sum() * 0.0
    with torch.no_grad():
        acc = ((diff > 0) & better).sum() / better.sum().clamp(min=1)
    return loss, acc.item()
