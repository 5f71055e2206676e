"""`python -m engine export`: a run's final policy as a plain transformers directory (weights in
safetensors, config, tokenizer), which transformers and vLLM load as is. Written atomically."""
from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import _atomic_dir

STAGES = ("pretrain", "sft", "ppo", "ppo_ptx")


def export_policy(run_dir: str | Path, stage: str, to: str | Path) -> Path:
    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {STAGES}, got {stage!r}")
    src = Path(run_dir) / stage / "final" / "policy"
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no finished {stage} policy: run `python -m engine "
                                f"{stage.replace('_ptx', '')} --out {run_dir}` first")
    to = Path(to)
    _atomic_dir(to, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
    return to
