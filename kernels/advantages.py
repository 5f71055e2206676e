"""Advantage estimators, one switch: InstructGPT's GAE with a critic, and the critic-free estimators people run
in 2026, all from the same KL-shaped per-token rewards (kernels.shape_rewards: the RM score at the last token
minus beta * KL; beta = 0 leaves the scores alone):

    gae           GAE(gamma, lam) with the value model's estimates; returns for the value loss
    reinforce_pp  REINFORCE++: returns-to-go of the rewards (lam = 1, no critic), whitened over the batch
    grpo          each answer's total reward against its prompt's group: (r - mean) / (std + eps)
    drgrpo        Dr. GRPO: r - mean, no division by the std
    rloo          RLOO: r - mean of the prompt's other n - 1 answers

The group estimators give every token of an answer its sequence's advantage. Pure functions over tensors;
the kernels they call (gae, group_advantages) carry the backends.
"""
from __future__ import annotations

import torch

from .ops import gae, group_advantages
from .stats import masked_sum

ESTIMATORS = ("gae", "grpo", "drgrpo", "rloo", "reinforce_pp")
GROUP = ("grpo", "drgrpo", "rloo")


def needs_critic(estimator: str) -> bool:
    return estimator == "gae"


def estimate_advantages(estimator: str, rewards: torch.Tensor, mask: torch.Tensor, *,
                        values: torch.Tensor | None = None, n: int = 1, gamma: float = 1.0, lam: float = 0.95,
                        whiten: bool = True, eps: float = 1e-6, backend: str = "auto"):
    """(advantages [B, T], returns [B, T] or None) from the shaped rewards [B, T] (zero where mask is 0).

    values [B, T]: the critic's estimates (gae only). n: answers per prompt, rows prompt-major (the group
    estimators). whiten: whiten GAE's advantages over the batch (REINFORCE++ always does; the group
    estimators normalise within their groups instead). Returns are only GAE's (the value loss's target).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "gae":
        if values is None:
            raise ValueError("`values` are needed for estimator 'gae' (the critic's estimates, [B, T])")
        return gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, backend=backend)
    if estimator == "reinforce_pp":
        adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, whiten=True, backend=backend)
        return adv, None
    per_answer = group_advantages(masked_sum(rewards, mask, dim=1), n, mode=estimator, eps=eps, backend=backend)
    return per_answer[:, None].to(rewards.dtype) * (mask != 0).to(rewards.dtype), None
