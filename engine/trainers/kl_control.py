"""KL coefficient control: fixed, or Ziegler et al.'s (2019) adaptive proportional controller."""
from __future__ import annotations

from dataclasses import dataclass


def adaptive_kl_coef(coef: float, current_kl: float, target_kl: float, n_steps: int, horizon: int) -> float:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""
    error = max(-0.2, min(0.2, current_kl / target_kl - 1.0))
    return coef * (1.0 + error * n_steps / horizon)


@dataclass
class KLController:
    """beta, the KL penalty's coefficient: fixed, or moved after each iteration toward `target` nats per
    sequence (adaptive). `coef` is what the next iteration uses; a checkpoint saves and restores it."""
    coef: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    @classmethod
    def from_config(cls, cfg) -> "KLController":
        """cfg: engine.config.PPOConfig."""
        return cls(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)

    def update(self, kl: float, n_steps: int) -> None:
        """After an iteration whose sequences had mean KL `kl` over `n_steps` sequences."""
        if self.adaptive:
            self.coef = adaptive_kl_coef(self.coef, kl, self.target, n_steps, self.horizon)
