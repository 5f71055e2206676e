"""One reward from the scores of an ensemble's members (Coste et al. 2023, arXiv 2310.02743):

- mean: the members' mean;
- wco (worst-case optimisation): the members' minimum;
- uwo (uncertainty-weighted optimisation): mean - lambda * variance (the population variance over members,
  as in the paper's eq. 3).

The spread (the members' standard deviation per answer) is logged: where they disagree, the policy has
found answers the rankings did not pin down.
"""
from __future__ import annotations

import torch

MODES = ("mean", "wco", "uwo")


def combine(scores: torch.Tensor, mode: str, uwo_lambda: float = 1.0) -> torch.Tensor:
    """scores: [M, B] of M members for B answers -> the ensemble's reward [B], in scores' dtype."""
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"combine: scores must be [members, answers], got shape {tuple(scores.shape)}")
    if mode == "mean":
        return scores.mean(0)
    if mode == "wco":
        return scores.min(0).values
    if mode == "uwo":
        if uwo_lambda < 0:
            raise ValueError(f"combine: uwo's lambda must be >= 0 (a penalty on disagreement), got {uwo_lambda}")
        return scores.mean(0) - uwo_lambda * scores.var(0, unbiased=False)
    raise ValueError(f"combine: mode must be one of {', '.join(MODES)}, got {mode!r}")


def spread(scores: torch.Tensor) -> torch.Tensor:
    """The members' standard deviation per answer, [B] (0 with one member)."""
    return scores.std(0, unbiased=False)
