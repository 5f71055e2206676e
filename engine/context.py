"""What every stage of a run shares: the config, the output directory, the tokenizer, and the built-in task
when the run is on it (the task then fills in the data files a user would give)."""
from __future__ import annotations

import dataclasses
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import Config
from .models.loading import load_tokenizer
from .parallel import distributed as dist
from .rundir.atomic import remove_leftovers

log = logging.getLogger("engine")


@dataclass
class RunContext:
    cfg: Config
    out: Path
    tokenizer: object         # the policy's (the built-in task's before pretraining)
    task: object | None       # engine.task.builtin.BuiltinTask, or None when training the user's checkpoint

    def using(self, **paths) -> "RunContext":
        """This context with other checkpoints in roles (policy=DIR, reward=DIR, ...); a new policy brings
        its tokenizer."""
        cfg = dataclasses.replace(self.cfg, **{role: dataclasses.replace(getattr(self.cfg, role), path=str(p))
                                               for role, p in paths.items()})
        tokenizer = load_tokenizer(paths["policy"], "--policy.path") if "policy" in paths else self.tokenizer
        return dataclasses.replace(self, cfg=cfg, tokenizer=tokenizer)

    @property
    def device(self) -> torch.device:
        return dist.device_of(self.cfg.run.device)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def fresh_stage_dir(self, stage: str) -> Path:
        """The stage's directory, ready to write: with --run.resume as it is (less the temporary folders an
        interrupted write left); with --run.overwrite emptied first; otherwise it must be new or empty, so
        that no earlier result or file of the user's is deleted without being asked."""
        path = self.stage_dir(stage)
        with dist.main_first():  # the main process checks and cleans; the others find it ready
            if dist.world().main:
                self._prepare(stage, path)
        return path

    def _prepare(self, stage: str, path: Path) -> None:
        run = self.cfg.run
        if path.is_dir() and any(path.iterdir()) and not run.resume:
            if not run.overwrite:
                raise FileExistsError(
                    f"{path} already holds a {stage} run ({_describe(path)}). Continue it with --run.resume true, "
                    f"start it over with --run.overwrite true (deletes {path}), or pick another --out.")
            log.warning("%s: --run.overwrite true: deleting %s", stage, path)
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path)
        remove_leftovers(path / "checkpoints")

    def final(self, stage: str, model: str) -> Path:
        path = self.stage_dir(stage) / "final" / model
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path} does not exist: run `python -m engine {stage.replace('_ptx', '')} --run.out {self.out}` "
                f"first (or `python -m engine pipeline`)"
            )
        return path


def _describe(path: Path) -> str:
    if (path / "final").is_dir():
        return "finished"
    steps = sorted(p.name for p in (path / "checkpoints").glob("step-*"))
    return f"checkpoints up to {steps[-1]}" if steps else "no checkpoint yet"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_device(run) -> None:
    """--run.device and --run.attention against what this machine has, before any work starts."""
    from .models.loading import resolve_attention

    if run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--run.device cuda: torch sees no CUDA GPU here (torch {torch.__version__}, "
                         f"torch.cuda.is_available() is False); use --run.device cpu")
    resolve_attention(run.attention, torch.device(run.device))


def make_context(cfg: Config) -> RunContext:
    from .models.forward import quiet_transformers

    quiet_transformers()
    check_device(cfg.run)
    torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    out = Path(cfg.run.out)
    task = None
    with dist.main_first():  # the main process writes the files, the others read them
        if dist.world().main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        if not cfg.local:  # the built-in task makes what a user would bring
            from .task.builtin import BuiltinTask

            task = BuiltinTask.open(cfg.task, out)
            cfg = dataclasses.replace(cfg, data=task.data_config(cfg.data))
    tokenizer = load_tokenizer(cfg.policy.path, "--policy.path") if cfg.local else \
        load_tokenizer(task.tokenizer_dir, "the built-in task's tokenizer", model=False)
    return RunContext(cfg, out, tokenizer, task)
