"""The losses as pure functions: InstructGPT's three (clipped policy, clipped value, K-way ranking), with the
options of the critic-free recipes: DAPO's decoupled clipping (clip_low, clip_high) and token-level mean,
GRPO's per-sequence mean, Dr. GRPO's constant normaliser (`aggregate`), and GRPO's KL term in the loss
(`kl_loss`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_estimator, check_loss_args, check_positive
from .reference import kl_penalty
from .stats import masked_mean

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              norm_len: float | None = None) -> torch.Tensor:
    """A per-token loss [B, T] reduced to a scalar over the valid tokens (mask [B, T]).

    token-mean:              sum over valid tokens / their number (DAPO: every token weighs the same)
    seq-mean-token-mean:     the mean over sequences of each one's token mean (GRPO as published: a long
                             answer's tokens weigh less)
    seq-mean-token-sum-norm: the mean over sequences of each one's token sum / norm_len (Dr. GRPO: a constant
                             in place of the length; norm_len defaults to T, the longest the batch allows)
    Sequences without a valid token are left out of the per-sequence means.
    """
    if mode not in LOSS_AGGS:
        raise ValueError(f"`loss_agg` must be one of {LOSS_AGGS}, got {mode!r}")
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    m = (mask != 0).to(per_token.dtype)
    sums, counts = (per_token * m).sum(dim=1), m.sum(dim=1)
    has = counts > 0
    if mode == "seq-mean-token-mean":
        per_seq = sums / counts.clamp(min=1)
    else:
        norm = float(norm_len) if norm_len is not None else float(per_token.shape[1])
        check_positive("norm_len", norm)
        per_seq = sums / norm
    return (per_seq * has).sum() / has.sum().clamp(min=1)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float = 0.2,
                is_weights: torch.Tensor | None = None, *, clip_low: float | None = None,
                clip_high: float | None = None, loss_agg: str = "token-mean", norm_len: float | None = None):
    """PPO's clipped surrogate, all [B, T]. Returns (loss, stats).

    ratio = exp(logprobs - old_logprobs); per token max(-A * ratio, -A * clip(ratio, 1 - clip_low,
    1 + clip_high)), clip_low and clip_high defaulting to clip_eps (DAPO's clip-higher raises clip_high
    alone), reduced by `aggregate(.., loss_agg, norm_len)`. `is_weights` (optional, [B, T], no grad)
    multiplies each token's loss: the truncated importance-sampling correction for rollouts whose
    log-probs came from another engine.
    """
    low = clip_eps if clip_low is None else clip_low
    high = clip_eps if clip_high is None else clip_high
    check_loss_args(mask, "clip_eps", clip_eps, logprobs=logprobs, old_logprobs=old_logprobs,
                    advantages=advantages, is_weights=is_weights)
    check_positive("clip_low", low)
    check_positive("clip_high", high)
    # Masked positions (padding, an environment's tokens in an episode) may hold anything: selected away, not
    # multiplied by 0, so an overflowing ratio there cannot turn into a NaN (inf * 0) in the loss or its gradient.
    valid = mask != 0
    log_ratio = torch.where(valid, logprobs - old_logprobs, 0.0)
    advantages = torch.where(valid, advantages, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate(per_token, mask, loss_agg, norm_len)
    with torch.no_grad():
        log_ratio = log_ratio.detach()
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            # k3 estimate of KL(old || new), as in the PPO literature's "approx_kl"
            "approx_kl": masked_mean(torch.expm1(-log_ratio) + log_ratio, mask).item(),
        }
    return loss, stats


OFF_POLICY = ("tis", "decoupled")


def off_policy_weights(proximal: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor, *, mode: str = "tis",
                       cap: float = 2.0) -> tuple[torch.Tensor, dict]:
    """Per-token importance weights [B, T] (no grad) of answers sampled by a behaviour policy (the rollout
    engine's log-probs `behaviour`, [B, T]) for a PPO update clipped around `proximal` (the trainer's policy
    when the update starts, [B, T]); 0 on padding (mask [B, T]). w = exp(proximal - behaviour), then

    tis:       min(w, cap): truncated importance sampling (Ionides 2008; TRL, OpenRLHF and verl against the
               rollout engine), every token kept, the rare large weights clamped
    decoupled: w where w <= cap, else 0: AReaL's decoupled PPO objective (Fu et al. 2025), whose tokens
               beyond the cap are dropped from the gradient instead of clamped

    stats: the weights' mean, standard deviation and maximum before truncation ("is_weight_*"), the share of
    tokens the cap changed ("is_truncated"), and the effective sample size of the final weights as a fraction
    of the tokens, (sum w)^2 / (n sum w^2) ("is_ess": 1 when all weights are equal)."""
    if mode not in OFF_POLICY:
        raise ValueError(f"off-policy correction must be one of {OFF_POLICY}, got {mode!r}")
    check_loss_args(mask, "cap", cap, proximal=proximal, behaviour=behaviour)
    with torch.no_grad():
        valid = mask != 0
        raw = torch.exp((proximal - behaviour).double()) * valid
        over = (raw > cap) & valid
        w = raw.clamp(max=cap) if mode == "tis" else torch.where(over, torch.zeros_like(raw), raw)
        n = valid.sum().clamp(min=1)
        x = raw[valid]
        stats = {"is_weight_mean": float(x.mean()) if x.numel() else 1.0,
                 "is_weight_std": float(x.std(unbiased=False)) if x.numel() else 0.0,
                 "is_weight_max": float(x.max()) if x.numel() else 1.0,
                 "is_truncated": float(over.sum() / n),
                 "is_ess": float(w.sum() ** 2 / (n * (w * w).sum()).clamp(min=1e-300)) if x.numel() else 1.0}
    return w.to(proximal.dtype), stats


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


def kl_loss(logprobs, ref_logprobs, mask, *, estimator: str = "k3", loss_agg: str = "token-mean",
            norm_len: float | None = None):
    """GRPO's KL term in the loss: the per-token estimate of KL(policy || reference) (k3 by default, as
    DeepSeekMath; k1, k2 too), reduced like the policy loss; differentiable in `logprobs`. Returns (loss,
    stats)."""
    check_loss_args(mask, "norm_len", 1.0 if norm_len is None else norm_len, logprobs=logprobs,
                    ref_logprobs=ref_logprobs)
    check_estimator(estimator)
    loss = aggregate(kl_penalty(logprobs, ref_logprobs, estimator), mask, loss_agg, norm_len)
    return loss, {"kl_loss": loss.item()}
