"""Dropout off in a model the RL and preference stages train (PPO, GRPO, DPO): with it on, the same forward
gives other log-probs each time, so the old log-probs PPO reuses, its ratios and DPO's reference margins are
noise (TRL's DPOTrainer and OpenRLHF turn it off too). SFT and the reward model keep the checkpoint's."""
from __future__ import annotations

from torch import nn


def disable_dropout(model: nn.Module) -> int:
    """Every dropout in `model` set to 0: nn.Dropout layers and the dropout rates attention modules read at each
    forward (Llama's `attention_dropout`). The config is left as it was (as TRL does): the saved model is the
    user's architecture, trained here without noise. Returns how many were not 0 already."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            changed += module.p != 0
            module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                changed += value != 0
                setattr(module, name, 0.0)
    return changed
