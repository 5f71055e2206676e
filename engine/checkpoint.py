"""Atomic checkpoints: models as transformers `save_pretrained` (safetensors) plus the trainer state
(optimizers, step, RNG streams) as one torch file.

Layout of a stage directory:
    checkpoints/step-000200/{<model name>/, trainer.pt}
    checkpoints/latest            name of the newest complete checkpoint
    final/                        the stage's result (written once, at the end)
Every directory is written under a temporary name and renamed into place, and `latest` is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

KEEP = 2  # checkpoints kept per stage


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _atomic_dir(target: Path, write) -> None:
    """Call write(tmp_dir), then rename tmp_dir to target (replacing an old target)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_models(target: Path, models: dict, tokenizer=None) -> None:
    def write(tmp: Path):
        for name, model in models.items():
            model.save_pretrained(tmp / name, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / name)
    _atomic_dir(target, write)


def save_checkpoint(stage_dir: Path, step: int, models: dict, state: dict, tokenizer=None) -> Path:
    """Write checkpoints/step-N atomically, point `latest` at it, prune older ones. Returns its path."""
    ckpts = stage_dir / "checkpoints"
    target = ckpts / f"step-{step:06d}"

    def write(tmp: Path):
        for name, model in models.items():
            model.save_pretrained(tmp / name, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / name)
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / "trainer.pt")

    _atomic_dir(target, write)
    write_text_atomic(ckpts / "latest", target.name)
    for old in sorted(p for p in ckpts.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(stage_dir: Path) -> Path | None:
    pointer = stage_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer.pt").exists() else None


def load_trainer_state(ckpt: Path) -> dict:
    state = torch.load(ckpt / "trainer.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state


def is_done(stage_dir: Path) -> bool:
    return (stage_dir / "final").is_dir()
