"""Metrics: one JSONL file per stage (the source of truth for plots and reports) plus TensorBoard events."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("engine")


class MetricsLogger:
    def __init__(self, stage_dir: Path, stage: str, tensorboard: bool = True):
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.path = stage_dir / "metrics.jsonl"
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(stage_dir / "tensorboard"))
            except ImportError:  # TensorBoard is optional; the JSONL always exists
                log.warning("tensorboardX not installed: writing metrics.jsonl only")

    def log(self, step: int, **values) -> None:
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{self.stage}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
