"""KL coefficient control: fixed, or Ziegler et al.'s (2019) adaptive proportional controller."""
from __future__ import annotations


def adaptive_kl_coef(coef: float, current_kl: float, target_kl: float, n_steps: int, horizon: int) -> float:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""
    error = max(-0.2, min(0.2, current_kl / target_kl - 1.0))
    return coef * (1.0 + error * n_steps / horizon)
