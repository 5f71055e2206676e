"""`python -m engine export`: a run's final policy as a plain transformers directory (weights in
safetensors, config, tokenizer), which transformers and vLLM load as is. Written atomically.

The target must be new or empty; a non-empty one is replaced only with `--overwrite true`, and never when
it is the run directory, holds it, overlaps the policy being exported, or lies inside the run.

A received run is data: only its regular files and folders are copied. A symbolic link (to a file outside
the run, or to /dev/zero, which would fill the disk) or a special file (a pipe, a device) anywhere in the
policy is refused by name before anything is written, and files are opened without following links.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from .atomic import atomic_dir

STAGES = ("pretrain", "sft", "ppo", "ppo_ptx", "dpo", "dpo_ipo", "dpo_listwise")


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def export_policy(run_dir: str | Path, stage: str, to: str | Path, overwrite: bool = False) -> Path:
    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {STAGES}, got {stage!r}")
    src = Path(run_dir) / stage / "final" / "policy"
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no finished {stage} policy: run `python -m engine "
                                f"{stage.replace('_ptx', '').split('_')[0]} --out {run_dir}` first")
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
    files = regular_files(Path(run_dir), src)
    atomic_dir(to, lambda tmp: copy_files(src, files, tmp))
    return to


def _refuse(path: Path, what: str):
    raise ValueError(f"{path} is {what}; a run's policy holds only regular files and folders, and export copies "
                     f"nothing else (a link could lead anywhere on this machine). Replace it with the file itself.")


def regular_files(run_dir: Path, src: Path) -> list[Path]:
    """The files under `src` (paths relative to it), after checking that src, the folders from the run
    directory down to it, and everything under it are regular files or folders."""
    for p in [*reversed(src.relative_to(run_dir).parents), src.relative_to(run_dir)]:
        if p != Path(".") and (run_dir / p).is_symlink():
            _refuse(run_dir / p, "a symbolic link")
    files = []
    for root, dirs, names in os.walk(src):  # a linked folder is listed in dirs, never entered
        for name in sorted(dirs + names):
            path = Path(root) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                _refuse(path, "a symbolic link")
            if stat.S_ISREG(mode):
                files.append(path.relative_to(src))
            elif not stat.S_ISDIR(mode):
                _refuse(path, "not a regular file (a pipe, socket or device)")
    return files


def copy_files(src: Path, files: list[Path], dst: Path) -> None:
    """Copy `files` (relative to src) into dst, each opened without following a link (O_NOFOLLOW) and checked
    to be a regular file once open, so that nothing swapped in since the check is followed."""
    for rel in files:
        try:
            fd = os.open(src / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # ELOOP: it became a link
                _refuse(src / rel, "a symbolic link")
            raise
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                _refuse(src / rel, "not a regular file (a pipe, socket or device)")
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(dst / rel, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
