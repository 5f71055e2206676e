"""Metrics: one JSONL file per stage (the source of truth for plots and reports) plus TensorBoard events.

A stage that starts at step `start` (a resumed run) first drops the rows and events of later steps that an
interrupted run logged after its last checkpoint, so every step appears once."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("engine")


class MetricsLogger:
    def __init__(self, stage_dir: Path, stage: str, tensorboard: bool = True, start: int = 0):
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.path = stage_dir / "metrics.jsonl"
        rows = read_metrics(self.path)
        purge = None
        if any(r.get("step", 0) > start for r in rows):
            from .atomic import write_text_atomic

            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= start))
            purge = start + 1
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=purge)
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
    """The rows of a metrics.jsonl; a last line cut short by a crash is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
