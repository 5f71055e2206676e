"""What keeps a run from losing work: a NaN/inf loss stops it with the last good checkpoint named."""
from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import latest_checkpoint


class NonFiniteLossError(RuntimeError):
    pass


def check_finite(value: float, *, what: str, stage: str, step: int, stage_dir: Path) -> None:
    if math.isfinite(value):
        return
    last = latest_checkpoint(stage_dir)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise NonFiniteLossError(
        f"{stage}: {what} became {value} at step {step}; training stopped and nothing was saved after it "
        f"({where}). Lower the learning rate or check the data, then rerun with --run.resume true."
    )
