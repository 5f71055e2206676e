"""What every stage of a run shares: the config, the output directory, the tokenizer and the task data."""
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
from .task.datasets import TaskData, make_task_data, save_task_data
from .task.vocab import build_tokenizer, load_tokenizer

log = logging.getLogger("engine")


@dataclass
class RunContext:
    cfg: Config
    out: Path
    tokenizer: object
    data: TaskData | None     # the built-in task's data; None when training the user's checkpoint

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.run.device)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def fresh_stage_dir(self, stage: str) -> Path:
        """The stage's directory, emptied first unless the run resumes."""
        path = self.stage_dir(stage)
        if path.exists() and not self.cfg.run.resume:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def final(self, stage: str, model: str) -> Path:
        path = self.stage_dir(stage) / "final" / model
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path} does not exist: run `python -m engine {stage.replace('_ptx', '')} --run.out {self.out}` "
                f"first (or `python -m engine pipeline`)"
            )
        return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_context(cfg: Config) -> RunContext:
    from .models import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if cfg.local:  # the user's checkpoint brings its tokenizer; data come from --data.* files per stage
        from .loading import load_tokenizer as load_checkpoint_tokenizer

        return RunContext(cfg, out, load_checkpoint_tokenizer(cfg.policy.path, "--policy.path"), None)
    tok_dir = out / "tokenizer"
    if tok_dir.is_dir():
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(str(tok_dir))
    data = make_task_data(cfg.task)
    if not (out / "data" / "eval_prompts.jsonl").exists():
        save_task_data(data, out / "data")
    return RunContext(cfg, out, tokenizer, data)
