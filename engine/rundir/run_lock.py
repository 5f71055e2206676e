"""One run per directory: `<out>/.lock`, held for the run's life by its main process.

The lock is the kernel's (`fcntl.flock` on the open file), so it ends with the process that holds it, however
that process ends: a run killed by `kill -9` or a power cut leaves the file but no lock, and the next run
takes it over (saying whose it was). The file holds the holder's pid, host, start time and command as JSON,
which a second start quotes when it refuses. A clean exit removes the file; a lock acquired on a file that
was replaced meanwhile (its holder removing it between our open and our flock) is dropped and taken again,
so two runs can never both hold one.

Under torchrun the main rank (rank 0) takes the lock and tells the others; every rank stops when it is
refused, the main one with the message.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from ..parallel import distributed as dist

log = logging.getLogger("engine")

LOCK_NAME = ".lock"


class RunLockedError(FileExistsError):
    """Another live process holds the run directory."""


def _describe(info: dict) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command', '?')}")


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8", errors="replace") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _open(path: Path) -> int:
    try:  # never through a link: the lock is a file of the run itself
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunLockedError(f"{path} is a symbolic link; a run's lock is a file of the run directory itself. "
                                 f"Remove the link and start again.") from None
        raise


def acquire(out: Path, command: str) -> int:
    """Take `<out>/.lock` for this process (creating `out`); returns the open descriptor that holds it, or
    raises RunLockedError naming the live holder."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunLockedError(
                f"{out} is in use by another run ({_describe(holder)}). One run per directory: wait for it to "
                f"finish (or stop it), then start again, or give another --out.") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the file we locked must still be the one at `path` (its holder may have removed it just now)
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _read(fd)
    if stale:
        log.warning("%s: taking over the lock of %s, which is no longer running", out, _describe(stale))
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode())
    os.fsync(fd)
    return fd


def release(out: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (out / LOCK_NAME).unlink()  # while still holding it: a waiting opener finds the inode gone and retries
    os.close(fd)


@contextlib.contextmanager
def run_lock(out: Path, command: str | None = None):
    """Hold `out`'s lock for the block: on the main rank, which tells the others whether it got it."""
    command = command or " ".join(["python -m engine", *sys.argv[1:]])
    fd, refused = None, None
    if dist.world().main:
        try:
            fd = acquire(out, command)
        except RunLockedError as exc:
            refused = str(exc)
        except OSError as exc:  # a folder we may not write: say so on every rank's behalf
            refused = f"cannot take the lock of {out}: {exc.strerror or exc}"
    refused = dist.broadcast(refused)
    if refused:
        if dist.world().main:
            raise RunLockedError(refused)
        raise SystemExit(2)  # the main rank says why, once
    try:
        yield
    finally:
        if fd is not None:
            release(out, fd)
