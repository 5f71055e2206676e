"""One optimizer setup for every trainer: AdamW (betas 0.9, 0.95), an optional warm-up + cosine schedule, and
gradient clipping, configured by the same fields in each training section (lr, weight_decay,
max_grad_norm; warmup where there is a schedule)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..parallel.distributed import full, shard_like

log = logging.getLogger("engine")


def warmup_cosine(optimizer, warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up for `warmup` steps, then cosine decay to `floor` of the peak rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Optim:
    """AdamW over a model's trainable parameters (LoRA trains only a few), its schedule, and its clipping.

    lr: the configured peak rate, honoured when a run resumes with another one; flag: its command-line
    name, for messages.
    """
    optimizer: torch.optim.Optimizer
    params: list
    lr: float
    flag: str
    max_grad_norm: float
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    @classmethod
    def adamw(cls, model, *, lr: float, flag: str, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
              warmup: int | None = None, total: int | None = None) -> "Optim":
        """warmup and total: a warm-up + cosine schedule over `total` steps; None: a constant rate."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
        sched = warmup_cosine(opt, warmup, total) if warmup is not None else None
        return cls(opt, params, lr, flag, max_grad_norm, sched)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Clip the gradients to max_grad_norm, update, advance the schedule; returns the gradient norm
        before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return float(full(norm))  # a sharded model's norm is a DTensor

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), **self.schedule_state()}

    def schedule_state(self) -> dict:
        """The schedule's position (what a sharded checkpoint keeps beside the optimizer's DCP shards)."""
        return {"scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {}

    def load_state_dict(self, saved: dict) -> None:
        """A checkpoint's state (without "optimizer" when a sharded checkpoint already loaded it); then the
        configured peak rate: a rate changed between runs is used, and the log says so."""
        if "optimizer" in saved:
            self.optimizer.load_state_dict(_sharded_like(saved["optimizer"], self.params))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        _check_hyperparameters(self.optimizer, self.scheduler)
        before = self.scheduler.base_lrs[0] if self.scheduler is not None else self.optimizer.param_groups[0]["lr"]
        if before == self.lr:
            return
        log.warning("resuming with %s %g (the checkpoint was trained with %g)", self.flag, self.lr, before)
        if self.scheduler is None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            return
        sched = self.scheduler
        sched.base_lrs = [self.lr for _ in sched.base_lrs]
        for group, factor in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def _number(x, low: float, high: float = math.inf) -> bool:
    return type(x) in (int, float) and math.isfinite(x) and low <= x <= high


def _check_hyperparameters(optimizer, scheduler) -> None:
    """What a checkpoint set in the optimizer and its schedule, checked before a step uses it: a learning rate
    of -1 or NaN (or a string) in a changed trainer.json would train wrongly while the metrics say otherwise."""
    for i, group in enumerate(optimizer.param_groups):
        betas = group.get("betas", (0.0, 0.0))
        if not (_number(group.get("lr"), 0) and _number(group.get("eps", 1e-8), 0) and _number(
                group.get("weight_decay", 0.0), 0) and isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(_number(b, 0, 1) for b in betas)):
            raise ValueError(f"parameter group {i}: lr {group.get('lr')!r}, betas {betas!r}, eps {group.get('eps')!r}, "
                             f"weight_decay {group.get('weight_decay')!r}: not an AdamW setting")
    if scheduler is not None:
        if not all(_number(lr, 0) for lr in scheduler.base_lrs) or type(scheduler.last_epoch) is not int \
                or scheduler.last_epoch < 0:
            raise ValueError(f"the schedule's base rates {scheduler.base_lrs!r} or position {scheduler.last_epoch!r} "
                             f"are not a schedule's")


def _sharded_like(state: dict, params: list) -> dict:
    """A one-process optimizer state read by several processes: each whole moment tensor cut like its
    (sharded) parameter. Unchanged when the parameters are whole."""
    if not params or not hasattr(params[0], "device_mesh"):
        return state
    ids = [i for g in state["param_groups"] for i in g["params"]]
    by_id = dict(zip(ids, params))
    moments = {i: {k: (shard_like(v, by_id[i]) if torch.is_tensor(v) and v.shape == by_id[i].shape else v)
                   for k, v in s.items()} for i, s in state["state"].items()}
    return {**state, "state": moments}
