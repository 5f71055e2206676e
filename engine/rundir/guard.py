"""What keeps a run from saving a broken model: a non-finite loss stops it at once, and the weights are
checked before every checkpoint, so the checkpoint the message names as the last good one is good.

Divergence without a NaN is caught too: a weight larger than GROWTH times the largest weight magnitude
at the start of the stage (or 1, whichever is larger) means the updates blew the model up (e.g. lr 1e6
gives weights of ~4e6, a loss stuck at ln V and zero gradients, but no NaN).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..parallel import distributed as dist
from .atomic import CheckpointError
from .checkpoint import latest_checkpoint

GROWTH = 100.0


class DivergedError(RuntimeError):
    """Training stopped because the loss or the weights stopped being usable; nothing after it was saved."""


NonFiniteLossError = DivergedError  # the name before weights were checked too


def _advice(stage: str, stage_dir: Path, lr: float | None) -> str:
    last = latest_checkpoint(stage_dir)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    flag = f"--{stage.replace('_ptx', '')}.lr"
    now = f" (now {lr:g})" if lr is not None else ""
    return (f"training stopped and nothing was saved after it ({where}). Lower the learning rate ({flag}{now}) "
            f"or check the data, then rerun with --run.resume true (the new learning rate is used).")


def check_finite(value: float, *, what: str, stage: str, step: int, stage_dir: Path, lr: float | None = None) -> None:
    if math.isfinite(value):
        return
    raise DivergedError(f"{stage}: {what} became {value} at step {step}; {_advice(stage, stage_dir, lr)}")


@torch.no_grad()
def _magnitudes(models: dict):
    """(model name, parameter name, its largest |weight|) for every non-empty parameter; with several
    processes the max over every rank's shard (one collective), so every rank stops at the same step."""
    names, maxima = [], []
    for name, model in models.items():
        for pname, p in model.named_parameters():
            if p.numel():
                shard = dist.local(p.detach())
                names.append((name, pname))
                maxima.append(shard.abs().max().float() if shard.numel() else torch.zeros((), device=shard.device))
    values = dist.all_max(torch.stack(maxima).cpu()).tolist() if maxima else []
    for (name, pname), m in zip(names, values):
        yield name, pname, m


def check_weights(models: dict, start_scale: float, *, stage: str, step: int, stage_dir: Path,
                  lr: float | None = None) -> None:
    """Raise DivergedError when a weight is not finite or grew past GROWTH x max(start_scale, 1)."""
    limit = GROWTH * max(start_scale, 1.0)
    for name, pname, m in _magnitudes(models):
        if not math.isfinite(m):
            raise DivergedError(f"{stage}: the {name} model's weight {pname} is not finite after step {step}; "
                                f"{_advice(stage, stage_dir, lr)}")
        if m > limit:
            raise DivergedError(
                f"{stage}: the {name} model's weights diverged by step {step} (|{pname}| reached {m:.3g}, over "
                f"{GROWTH:g}x the largest weight at the start, {start_scale:.3g}); {_advice(stage, stage_dir, lr)}")


def check_start(models: dict, *, stage: str, stage_dir: Path, resumed: bool, saved_scale: float | None) -> float:
    """The stage's starting weight scale, after checking the weights it starts from. Resumed, they are a
    checkpoint's, which was written only after this same check passed: a weight that is not finite, or past
    GROWTH x the scale the stage started at (kept in the checkpoint), means the checkpoint was damaged since,
    which is said as such (not as a divergence to cure with a lower learning rate). saved_scale: that kept
    scale, or None (a checkpoint from before it was kept)."""
    limit = GROWTH * max(saved_scale, 1.0) if saved_scale is not None else math.inf
    worst = 0.0
    for name, pname, m in _magnitudes(models):
        if math.isfinite(m) and m <= limit:
            worst = max(worst, m)
            continue
        if resumed:
            raise CheckpointError(
                f"{latest_checkpoint(stage_dir)}: the {name} model's weight {pname} is {m:.3g} (the stage started at "
                f"{saved_scale if saved_scale is not None else 'an unknown scale'}): the checkpoint is damaged, since "
                f"a checkpoint is written only after its weights are checked. Write the name of an earlier "
                f"checkpoint into {stage_dir / 'checkpoints' / 'latest'}, or start the stage over with "
                f"--run.overwrite true.")
        raise ValueError(f"{stage}: the {name} model's weight {pname} is {m} before training starts: the model it "
                         f"starts from is damaged; check the checkpoint its path flag names")
    return saved_scale if resumed and saved_scale is not None else worst
