"""The step loop every trainer shares: progress bar, metrics, periodic checkpoints, divergence stop,
and Ctrl-C at step boundaries."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..parallel import distributed as dist
from ..rundir.atomic import CheckpointError
from ..rundir.checkpoint import latest_checkpoint
from ..rundir.guard import check_finite, check_start, check_weights
from ..rundir.metrics import MetricsLogger
from ..seeds import step_seeds
from .state import TrainState

log = logging.getLogger("engine")


class StoppedAtStepBoundary(KeyboardInterrupt):
    """Ctrl-C, honoured after the step it arrived in finished and was saved."""


@contextlib.contextmanager
def deferred_interrupt(stage: str):
    """Yield a function telling whether Ctrl-C was pressed. The first Ctrl-C only sets that flag, so the step
    in progress finishes (a half-applied update is never saved); a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        log.warning("%s: Ctrl-C: finishing this step, then saving it (Ctrl-C again to stop at once; the "
                    "last checkpoint is kept)", stage)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def run_steps(*, stage: str, seed: int, start: int, total: int, step_fn: Callable[[int, torch.Generator], dict],
              state: TrainState, log_every: int, checkpoint_every: int, progress: bool, lr: float | None = None,
              loss_key: str = "loss") -> None:
    """Run step_fn(step, gen) for step in [start, total), each returning a dict of metrics with `loss_key`.

    Each step's randomness (`gen` for data order, and torch's global RNG) is seeded from (seed, stage, step),
    so a run resumed from any checkpoint draws exactly what an uninterrupted run would. `state` is saved every
    `checkpoint_every` steps and at the end, each time only after its models' weights were checked (finite,
    not exploded); a non-finite loss stops the run before anything else is saved. Ctrl-C takes effect at the
    end of the step it arrived in, which is then saved; an interrupt that escapes in the middle of a step
    saves nothing, so the last checkpoint stays the resume point. `lr` only goes into messages.
    """
    stage_dir, models = state.stage_dir, state.models
    start_scale = state.start_scale = check_start(models, stage=stage, stage_dir=stage_dir, resumed=start > 0,
                                                  saved_scale=state.start_scale)
    if start > total:
        raise CheckpointError(f"{latest_checkpoint(stage_dir)}: at step {start}, past this stage's {total} steps; "
                              f"the trainer state was changed? Resume from an earlier checkpoint, start the stage "
                              f"over with --run.overwrite true, or resume with at least {start} steps")
    main = dist.world().main  # with several processes the main rank logs; every rank checks and saves
    metrics = MetricsLogger(stage_dir, stage, start=start) if main else None
    held = None
    saved = start
    bar = tqdm(total=total, initial=start, desc=stage, disable=not (progress and main), dynamic_ncols=True,
               leave=False)

    def save(done: int) -> Path:
        nonlocal saved
        check_weights(models, start_scale, stage=stage, step=done, stage_dir=stage_dir, lr=lr)
        path = state.save(done)
        saved = done
        return path

    try:
        with deferred_interrupt(stage) as interrupted:
            for step in range(start, total):
                torch_seed, data_seed = step_seeds(seed, stage, step)
                torch.manual_seed(torch_seed)
                began = time.perf_counter()
                m = step_fn(step, torch.Generator().manual_seed(data_seed))
                m = {**m, "time/step": time.perf_counter() - began}
                if held is None:  # parameters + optimizer state this process holds (FSDP2: its shards, 1/W)
                    held = dist.held_bytes(models.values(), [o.optimizer for o in state.optims.values()]) / 2**20
                m["held_mib"] = held
                check_finite(float(m[loss_key]), what=loss_key, stage=stage, step=step + 1, stage_dir=stage_dir,
                             lr=lr)
                done = step + 1
                if main and (done % log_every == 0 or done == total):
                    metrics.log(done, **m)
                if done % checkpoint_every == 0 or done == total:
                    save(done)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in m.items() if isinstance(v, float) and "/" not in k},
                                refresh=False)
                if dist.any_rank(interrupted()):
                    path = save(done) if saved != done else stage_dir / "checkpoints" / f"step-{done:06d}"
                    log.warning("%s interrupted: saved step %d to %s; resume with --run.resume true", stage, done,
                                path)
                    raise StoppedAtStepBoundary
    except KeyboardInterrupt as exc:
        if not isinstance(exc, StoppedAtStepBoundary):
            log.warning("%s interrupted in the middle of a step: its partial update is not saved; the run resumes "
                        "from step %d (--run.resume true)", stage, saved)
        raise
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
