"""What a stage's checkpoint holds and how a stage starts: the one resume-and-save skeleton of every trainer.

A checkpoint (engine/rundir/checkpoint.py) is the trained models under their names plus the trainer state: each
optimizer's (and schedule's) state under the same name, the step, the RNG streams, and a stage's extra
scalars (PPO's KL coefficient).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from ..parallel import distributed as dist
from ..rundir.atomic import CheckpointError
from ..rundir.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from ..rundir.sharded import is_sharded, load_sharded, save_sharded_checkpoint
from .optim import Optim

log = logging.getLogger("engine")

def open_stage(ctx, stage: str, result: str) -> tuple[Path, Path, Path | None]:
    """(stage directory, its final result directory `final/<result>`, the checkpoint to resume from or None).

    The directory is made ready by ctx.fresh_stage_dir (refusing to delete an earlier run unasked); a stage
    that already finished is recognised by its final/ directory, which callers return at once."""
    stage_dir = ctx.fresh_stage_dir(stage)
    ckpt = latest_checkpoint(stage_dir) if ctx.cfg.run.resume and not (stage_dir / "final").is_dir() else None
    return stage_dir, stage_dir / "final" / result, ckpt


def saved_model(ckpt: Path | None, name: str) -> Path | None:
    """The model directory a checkpoint holds for `name` (what the stage's loader resumes from), or None: no
    checkpoint, or one written by several processes, whose weights `TrainState.restore` loads (DCP) into
    the model built from the stage's start."""
    return None if ckpt is None or is_sharded(ckpt) else ckpt / name


@dataclass
class TrainState:
    """The models a stage trains and the optimizers that train them, keyed by the same names.

    extra(): scalars saved with each checkpoint (e.g. {"kl_coef": 0.1}); `restore` returns them.
    """
    stage_dir: Path
    models: dict[str, nn.Module]
    optims: dict[str, Optim]
    tokenizer: object
    extra: Callable[[], dict] = field(default=dict)
    start_scale: float | None = None  # the largest |weight| when the stage began (its divergence guard's yardstick)

    def save(self, step: int) -> Path:
        kept = {} if self.start_scale is None else {"start_weight_scale": float(self.start_scale)}
        if dist.world().size > 1:  # each rank its shards (DCP); the schedules beside them in trainer.json
            state = {"optimizers": {name: o.schedule_state() for name, o in self.optims.items()}, **kept,
                     **self.extra()}
            return save_sharded_checkpoint(self.stage_dir, step, self.models,
                                           {n: o.optimizer for n, o in self.optims.items()}, state)
        state = {"optimizers": {name: o.state_dict() for name, o in self.optims.items()}, **kept, **self.extra()}
        return save_checkpoint(self.stage_dir, step, self.models, state, self.tokenizer)

    def restore(self, ckpt: Path) -> dict:
        """Load the optimizers' state (and the RNG streams) of checkpoint `ckpt`, and with a checkpoint of
        several processes the models' weights too; returns the whole trainer state ("step", the extras)."""
        state = load_trainer_state(ckpt)
        if is_sharded(ckpt):
            load_sharded(ckpt, self.models, {n: o.optimizer for n, o in self.optims.items()}, state.get("sharded"))
        saved = state.get("optimizers") or _legacy_optimizers(state, list(self.optims))
        for name, optim in self.optims.items():
            if name not in saved:
                raise CheckpointError(f"{ckpt}: no optimizer state for the {name} model; it was written by another "
                                      f"stage or version. Start the stage over with --run.overwrite true.")
            try:
                optim.load_state_dict(saved[name])
            except (ValueError, TypeError, KeyError) as exc:
                raise CheckpointError(f"{ckpt / 'trainer.json'}: the {name} optimizer's state cannot be used ({exc}); "
                                      f"the file was changed? Resume from an earlier checkpoint or start over with "
                                      f"--run.overwrite true.") from None
        scale = state.get("start_weight_scale")
        if scale is not None and (type(scale) not in (int, float) or not 0 <= scale < float("inf")):
            raise CheckpointError(f"{ckpt / 'trainer.json'}: start_weight_scale {scale!r} is not a weight magnitude; "
                                  f"the file was changed? Resume from an earlier checkpoint or start over with "
                                  f"--run.overwrite true.")
        self.start_scale = scale
        if state.get("world_size", 1) != dist.world().size:
            log.info("resuming a checkpoint of %d process(es) with %d", state.get("world_size", 1),
                     dist.world().size)
        return state


def train_one(stage_dir: Path, name: str, model: nn.Module, cfg, flag: str, tokenizer, ckpt: Path | None):
    """The state of a stage that trains one model with AdamW and a warm-up schedule (SFT, the RM, DPO) ->
    (optimizer, TrainState, the step to start from: the checkpoint's, or 0). cfg: the stage's section (lr,
    weight_decay, max_grad_norm, warmup, steps); flag: its learning rate's flag, for error messages."""
    optim = Optim.adamw(model, lr=cfg.lr, flag=flag, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                        warmup=cfg.warmup, total=cfg.steps)
    state = TrainState(stage_dir, {name: model}, {name: optim}, tokenizer)
    start = state.restore(ckpt)["step"] if ckpt else 0
    if ckpt:
        log.info("%s: resuming from %s", stage_dir.name, ckpt)
    return optim, state, start


def _legacy_optimizers(state: dict, names: list[str]) -> dict:
    """Optimizer states as checkpoints before 2026-11-24 kept them: "optimizer" + "scheduler" for the one
    model of SFT and the RM, "opt_policy" and "opt_value" for PPO's two."""
    if "optimizer" in state and len(names) == 1:
        return {names[0]: {"optimizer": state["optimizer"], "scheduler": state.get("scheduler")}}
    return {name: {"optimizer": state[f"opt_{name}"]} for name in names if f"opt_{name}" in state}
