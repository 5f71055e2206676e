"""Writes that are all or nothing: a folder written under a temporary name and renamed into place, a small text
file replaced with os.replace, the leftovers a crash leaves removed, and the two errors a run directory raises
(one that cannot be resumed as it is, one that could not be written). Everything in `engine.rundir` writes
through these."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError

log = logging.getLogger("engine")


class CheckpointError(ValueError):
    """A run directory that cannot be resumed as it is; the message says what is wrong and what to do."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, a read-only folder): nothing earlier was touched."""


def atomic_dir(target: Path, write) -> None:
    """Call write(tmp_dir), then rename tmp_dir to target (replacing an old target)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with write_errors(target):
            write(tmp)
        rename_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def write_errors(target: Path):
    """A failed write (a full disk, a read-only folder) as CheckpointWriteError naming `target`."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        code = getattr(exc, "errno", None) or errno.EIO
        raise CheckpointWriteError(code, f"could not write {target}: {reason(exc)}") from exc


def rename_into_place(tmp: Path, target: Path) -> None:
    """tmp becomes target; an old target is moved aside first and removed after."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def reason(exc: BaseException) -> str:
    """The OS's words for a failed write (safetensors wraps them: "I/O error: No space left on device")."""
    return getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def remove_leftovers(directory: Path) -> None:
    """Remove the `.NAME.tmp-*` / `.NAME.old-*` folders an interrupted write (kill -9, power loss) left."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name) and not p.is_symlink():
            log.info("removing %s, left by an interrupted write", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`path` replaced by `data` at once and durably: written to a new file beside it (created exclusively, so a
    link or file planted under a temporary name is never written through), fsynced, renamed over it, and the
    folder fsynced (a power cut leaves the old file or the new one, never an empty one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(exc.errno or errno.EIO, f"could not write {path}: {reason(exc)}") from exc
