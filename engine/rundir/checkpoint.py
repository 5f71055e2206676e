"""Atomic checkpoints: models as transformers `save_pretrained` (safetensors) plus the trainer state
(optimizers, scheduler, step, RNG streams) as safetensors + JSON (`engine.rundir.state_file`): nothing in a run
directory is a pickle, so loading one never runs code.

Layout of a stage directory:
    checkpoints/step-000200/{<model name>/, trainer.json, trainer.safetensors}
    checkpoints/latest            the name of the newest complete checkpoint, a sibling `step-N` folder
    final/                        the stage's result (written once, at the end)
Every directory is written under a temporary name and renamed into place, and `latest` is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact; the temporary folders a crash
leaves behind are removed when the stage next starts.

With more than one process (engine.parallel) a checkpoint holds the models and optimizers as one DCP
(torch.distributed.checkpoint) folder of safetensors shards, each rank writing its own, plus the same
trainer.json (engine.rundir.sharded): it resumes with any number of processes, one included. Final models are always
plain transformers directories (engine.rundir.final), consolidated by the main rank from every rank's shards.
"""
from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .atomic import CheckpointError, atomic_dir, write_text_atomic
from .state_file import StateFileError, has_state, read_state, write_state

log = logging.getLogger("engine")

KEEP = 2  # checkpoints kept per stage
STEP_NAME = re.compile(r"step-\d{6,}")
LEGACY_STATE = "trainer.pt"  # before 2026-11-24: a torch pickle, read only through weights_only=True


def rng_state() -> dict:
    """Every RNG stream a step draws from, as plain numbers and one tensor (no numpy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_models(folder: Path, models: dict, tokenizer) -> None:
    """Each model as a transformers directory `folder/<name>` (save_pretrained, safetensors) with the tokenizer."""
    for name, model in models.items():
        model.save_pretrained(folder / name, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / name)


def save_checkpoint(stage_dir: Path, step: int, models: dict, state: dict, tokenizer=None) -> Path:
    """Write checkpoints/step-N atomically, point `latest` at it, prune older ones. Returns its path."""
    ckpts = stage_dir / "checkpoints"
    target = ckpts / f"step-{step:06d}"

    def write(tmp: Path):
        write_models(tmp, models, tokenizer)
        write_state(tmp, {**state, "step": step, "rng": rng_state()})

    atomic_dir(target, write)
    publish(ckpts, target)
    return target


def publish(ckpts: Path, target: Path) -> None:
    """Point `latest` at the checkpoint just written and keep only the newest KEEP."""
    write_text_atomic(ckpts / "latest", target.name)
    for old in sorted(p for p in ckpts.glob("step-*") if p.is_dir() and STEP_NAME.fullmatch(p.name))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def _no_links(ckpt: Path) -> None:
    for p in [ckpt, *ckpt.rglob("*")]:
        if p.is_symlink():
            raise CheckpointError(f"{p} is a symbolic link; a checkpoint holds only its own files, and a link "
                                  f"could lead anywhere on this machine. Replace it with the file itself.")


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names, checked: None when the stage has none yet.

    `latest` may only name a sibling `step-N` folder holding its trainer state; anything else (a path that
    leaves the folder, a link, a checkpoint without its trainer state) is a CheckpointError saying what to do.
    """
    ckpts = stage_dir / "checkpoints"
    pointer = ckpts / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return None
    if pointer.is_symlink() or not pointer.is_file():
        raise CheckpointError(f"{pointer} must be a small text file naming a step-N folder beside it")
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name[:80]!r}; it may only name a step-N folder beside it "
                              f"(e.g. step-000200). Write the name of one of {_existing(ckpts)} into it.")
    path = ckpts / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name}, which does not exist in {ckpts}. Write the name of one of "
                              f"{_existing(ckpts)} into it, or start the stage over with --run.overwrite true.")
    _no_links(path)
    if not has_state(path):
        legacy = path / LEGACY_STATE
        if not legacy.is_file():
            raise CheckpointError(
                f"{path} holds no trainer state (trainer.json and trainer.safetensors), so the run cannot go on "
                f"exactly from it. Write the name of an earlier complete checkpoint ({_existing(ckpts)}) into "
                f"{pointer}, or start the stage over with --run.overwrite true.")
    return path


def _existing(ckpts: Path) -> str:
    names = sorted(p.name for p in ckpts.glob("step-*") if p.is_dir() and has_state(p))
    return ", ".join(names) if names else "no complete checkpoint"


def load_trainer_state(ckpt: Path) -> dict:
    """The checkpoint's trainer state; also restores the RNG streams it recorded."""
    if has_state(ckpt):
        try:
            state = read_state(ckpt)
        except StateFileError as exc:
            raise CheckpointError(f"{exc}. Resume from an earlier checkpoint (write its name into "
                                  f"{ckpt.parent / 'latest'}) or start over with --run.overwrite true.") from None
    else:
        state = _load_legacy(ckpt / LEGACY_STATE)
    step = state.get("step") if isinstance(state, dict) else None
    if type(step) is not int or step < 1:
        raise CheckpointError(f"{ckpt / 'trainer.json'}: step {step!r} is not a step a checkpoint is written at (a "
                              f"whole number from 1); the file was changed? Resume from an earlier checkpoint (write "
                              f"its name into {ckpt.parent / 'latest'}) or start over with --run.overwrite true.")
    try:
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / 'trainer.json'}: its RNG streams cannot be restored ({exc}); resume from an "
                              f"earlier checkpoint or start over with --run.overwrite true.") from None
    return state


def _load_legacy(path: Path) -> dict:
    """A trainer.pt from before the safetensors + JSON format, read with torch's weights-only unpickler
    (plain tensors, numbers, strings and containers, plus numpy's uint32 RNG array): anything that could
    run code is refused instead of loaded."""
    import pickle

    core = getattr(np, "_core", None) or np.core
    allowed = [np.ndarray, np.dtype, np.dtypes.UInt32DType, core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused: this trainer state (the pickle format of rlhf-engine before 2026-11-24) holds "
            f"more than plain tensors and numbers, and loading it could run code ({first[:200]}). Start the "
            f"stage over with --run.overwrite true, or resume only run directories you wrote yourself.") from None
    name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    state["rng"]["numpy"] = [name, np.asarray(keys).tolist(), pos, has_gauss, cached]
    log.info("%s: read a trainer state in the old format (weights only); the next checkpoint is written in "
             "the new one", path)
    return state


def is_done(stage_dir: Path) -> bool:
    return (stage_dir / "final").is_dir()
