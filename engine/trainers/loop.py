"""The step loop every trainer shares: progress bar, metrics, periodic checkpoints, NaN stop, Ctrl-C save."""
from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..guard import check_finite
from ..metrics import MetricsLogger

log = logging.getLogger("engine")


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def warmup_cosine(optimizer, warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up for `warmup` steps, then cosine decay to `floor` of the peak rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_seed(seed: int, stage: str, step: int) -> int:
    """The seed of one step's randomness: a function of (run seed, stage, step) only."""
    return (seed * 1000 + zlib.crc32(stage.encode()) % 1000) * 1_000_003 + step


def run_steps(*, stage: str, stage_dir: Path, seed: int, start: int, total: int,
              step_fn: Callable[[int, torch.Generator], dict], save_fn: Callable[[int], Path], log_every: int,
              checkpoint_every: int, progress: bool, loss_key: str = "loss") -> None:
    """Run step_fn(step, gen) for step in [start, total), each returning a dict of metrics with `loss_key`.

    Each step's randomness (`gen` for data order, and torch's global RNG) is seeded from (seed, stage, step),
    so a run resumed from any checkpoint, or after Ctrl-C in the middle of a step, draws exactly what an
    uninterrupted run would. Checkpoints every `checkpoint_every` steps and at the end; a non-finite loss
    raises NonFiniteLossError before anything else is saved; Ctrl-C saves the last completed step, then
    re-raises.
    """
    metrics = MetricsLogger(stage_dir, stage)
    done = start
    bar = tqdm(total=total, initial=start, desc=stage, disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for step in range(start, total):
            torch.manual_seed(step_seed(seed, stage, step))
            m = step_fn(step, torch.Generator().manual_seed(step_seed(seed, stage, step) + 1))
            check_finite(float(m[loss_key]), what=loss_key, stage=stage, step=step + 1, stage_dir=stage_dir)
            done = step + 1
            if done % log_every == 0 or done == total:
                metrics.log(done, **m)
            if done % checkpoint_every == 0 or done == total:
                save_fn(done)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in m.items() if isinstance(v, float)}, refresh=False)
    except KeyboardInterrupt:
        if done > start:
            path = save_fn(done)
            log.warning("%s interrupted: saved step %d to %s; resume with --run.resume true", stage, done, path)
        raise
    finally:
        bar.close()
        metrics.close()
