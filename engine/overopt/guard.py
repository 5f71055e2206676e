"""A stop before the gold peak, from what a run can see (no gold): the proxy's rise per unit of d.

Gao et al. (2022) found the gold peaking while the proxy still rises; here the proxy's gain per unit of
d = sqrt(KL to the start) is steep at first and flattens as the policy leaves the region the reward model
knows, and the gold peaks about where it flattens. The rule: at each evaluation (d_k, proxy_k), the slope
since the last evaluation that moved d by at least `min_step` is compared with the first one's (the gain
over d from the start); the guard fires at the first evaluation where it is below `fraction` of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ProxySlopeGuard:
    """feed(d, proxy_gain) at each evaluation -> True once the guard fires (and from then on).
    fraction: the share of the first slope below which it fires; min_step: the least move of d between two
    evaluations for their slope to count (d is estimated from samples: a smaller move is noise)."""
    fraction: float = 0.25
    min_step: float = 0.1
    first_slope: float | None = None
    anchor: tuple[float, float] = (0.0, 0.0)
    fired_at: float | None = None
    slopes: list = field(default_factory=list)

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise ValueError(f"the guard's fraction must be in (0, 1), got {self.fraction}")
        if self.min_step <= 0:
            raise ValueError(f"the guard's min_step must be > 0, got {self.min_step}")

    def feed(self, d: float, proxy_gain: float) -> bool:
        if self.fired_at is not None:
            return True
        d0, p0 = self.anchor
        if d - d0 < self.min_step:
            return False  # too close to the last anchor to say anything (or d went back: noise)
        slope = (proxy_gain - p0) / (d - d0)
        self.anchor = (d, proxy_gain)
        self.slopes.append(slope)
        if self.first_slope is None:
            self.first_slope = slope
            return False
        if self.first_slope > 0 and slope < self.fraction * self.first_slope:
            self.fired_at = d
            return True
        return False


def first_stop(points, fraction: float = 0.25, min_step: float = 0.1) -> int | None:
    """The index into `points` ((d, proxy gain) per evaluation, in order) where the guard fires, or None."""
    guard = ProxySlopeGuard(fraction, min_step)
    for i, (d, gain) in enumerate(points):
        if guard.feed(d, gain):
            return i
    return None
