"""Rollout backends behind one protocol (`generate`, `update_weights`, `close`)."""
from .base import RolloutBackend, RolloutResult
from .hf import HFRollout

__all__ = ["RolloutBackend", "RolloutResult", "HFRollout"]
