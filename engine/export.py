"""`python -m engine export`: a run's final policy as a plain transformers directory (weights in
safetensors, config, tokenizer), which transformers and vLLM load as is. Written atomically.

The target must be new or empty; a non-empty one is replaced only with `--overwrite true`, and never when
it is the run directory, holds it, overlaps the policy being exported, or lies inside the run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import _atomic_dir

STAGES = ("pretrain", "sft", "ppo", "ppo_ptx")


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def export_policy(run_dir: str | Path, stage: str, to: str | Path, overwrite: bool = False) -> Path:
    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {STAGES}, got {stage!r}")
    src = Path(run_dir) / stage / "final" / "policy"
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no finished {stage} policy: run `python -m engine "
                                f"{stage.replace('_ptx', '')} --out {run_dir}` first")
    to = Path(to)
    if to.is_symlink():
        raise ValueError(f"--to {to} is a symbolic link; give the real directory.")
    run, target = Path(run_dir).resolve(), to.resolve()
    if target == run or target in run.parents:
        raise ValueError(f"--to {to} is the run directory {run_dir} or holds it; exporting there would replace "
                         f"the run. Choose a directory outside it.")
    if _overlaps(target, src.resolve()):
        raise ValueError(f"--to {to} overlaps the policy being exported ({src}). Choose another directory.")
    if to.exists() and not to.is_dir():
        raise FileExistsError(f"--to {to} is a file, not a directory. Choose another path.")
    if to.is_dir() and any(to.iterdir()):
        if run in target.parents:
            raise ValueError(f"--to {to} is a non-empty directory inside the run {run_dir}; the run's files are "
                             f"never replaced. Choose a new directory.")
        if not overwrite:
            raise FileExistsError(f"--to {to} is not empty; its contents would be replaced. Choose a new or empty "
                                  f"directory, or give --overwrite true to replace them.")
    _atomic_dir(to, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
    return to
