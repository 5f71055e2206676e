"""Under torchrun: which process of the job ended, said once.

When a rank dies without a word (SIGKILL from the OOM killer, a crash in native code), torchrun SIGTERMs the
others and prints only its own failure block. So every rank learns the others' (rank, host, pid) when the job
starts, and on SIGTERM (or a collective that fails because a peer is gone) the lowest-ranked survivor says
which rank on its host ended and that `--run.resume true` continues from the last complete checkpoint.
A rank that ends with an error message of its own leaves a note in the job's temporary folder first, so
nobody repeats or contradicts it.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

_PEERS: list[tuple[int, str, int]] = []  # (rank, host, pid) of every rank, in rank order
_RANK = 0
_SPOKEN = False  # this process has said the job's one line (a failed collective, then torchrun's SIGTERM)


def _notes() -> Path:
    job = os.environ.get("TORCHELASTIC_RUN_ID") or f"{os.environ.get('MASTER_ADDR')}-{os.environ.get('MASTER_PORT')}"
    return Path(tempfile.gettempdir()) / f"rlhf-engine-job-{job}"


def join(rank: int, all_gather_object) -> None:
    """Learn every rank's (rank, host, pid) (a collective) and answer SIGTERM with `farewell`."""
    global _PEERS, _RANK
    parts: list = [None] * int(os.environ.get("WORLD_SIZE", "1"))
    all_gather_object(parts, (rank, socket.gethostname(), os.getpid()))
    _PEERS, _RANK = parts, rank
    if rank == 0:
        _notes().mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)


def said_why() -> None:
    """This rank is ending with an error message of its own (its peers then add nothing)."""
    if _PEERS:
        try:
            _notes().mkdir(exist_ok=True)
            (_notes() / f"rank-{_RANK}").touch()
        except OSError:
            pass


def _gone(pid: int) -> bool:
    """The process is gone, or a zombie its parent (torchrun) has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _lost(wait: float) -> list[tuple[int, int]]:
    """(rank, pid) of this host's peers that are gone, waiting up to `wait` seconds for one to be."""
    import time

    host, end = socket.gethostname(), time.monotonic() + wait
    while True:
        lost = [(r, pid) for r, h, pid in _PEERS if h == host and r != _RANK and _gone(pid)]
        if lost or time.monotonic() >= end:
            return lost
        time.sleep(0.05)


def peer_lost(wait: float) -> bool:
    """Whether a process of the job on this host is gone, waiting up to `wait` seconds for one to be."""
    return bool(_lost(wait))


def farewell(wait: float = 0.0) -> str | None:
    """The job's one line about why it stops, from the lowest-ranked survivor (None on the others, or when the
    rank that ended said why itself). wait: seconds to wait for a peer to be seen gone (a failed collective
    reaches this rank while the peer is still dying)."""
    global _SPOKEN
    if not _PEERS or _SPOKEN:
        return None
    lost = _lost(wait)
    if any(r < _RANK and (r, pid) not in lost for r, _, pid in _PEERS):
        return None  # a lower rank survives (or lives on another host): it speaks
    resume = "every complete checkpoint is kept: rerun the same command with --run.resume true to continue"
    silent = [(r, pid) for r, pid in lost if not (_notes() / f"rank-{r}").exists()]
    if lost and not silent:
        return None
    _SPOKEN = True
    if silent:
        r, pid = silent[0]
        return (f"error: rank {r} (pid {pid} on {socket.gethostname()}) ended without a word (killed: out of memory, "
                f"a signal, or a crash outside Python), so the job stopped; {resume}")
    if wait:
        return f"error: a collective operation of the job failed on rank {_RANK} (a process on another host?); {resume}"
    return f"error: the job was stopped from outside (SIGTERM to rank {_RANK}); {resume}"


def leave() -> None:
    """A clean end of the job: the main rank removes the notes folder. (After a failure it stays, a few
    empty files in the temporary folder: removing it while a peer still ends would make that peer say
    "ended without a word" of a rank that did say why.)"""
    if _PEERS and _RANK == 0:
        import shutil

        shutil.rmtree(_notes(), ignore_errors=True)


def say_farewell(wait: float = 0.0) -> None:
    """Print `farewell(wait)` when it has something to say, with SIGTERM held back meanwhile (torchrun's
    SIGTERM then finds the line said and adds nothing, instead of cutting it off or repeating it)."""
    arrived: list[int] = []
    # Python runs handlers in the main thread whichever thread the signal reached, so a thread's signal mask
    # would not hold it back: a handler that only notes the signal does, until the line is out.
    before = signal.signal(signal.SIGTERM, lambda signum, frame: arrived.append(signum))
    try:
        _say(farewell(wait))
    finally:
        signal.signal(signal.SIGTERM, before)
    if arrived and callable(before):
        before(arrived[0], None)


def exit_now(code: int) -> None:
    """End this process at once with `code`, deaf to torchrun's SIGTERM from here on (every rank has said
    what it had to; a SIGTERM now would only turn the exit code into 143)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # process-wide (a mask would hold for this thread only)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _say(message: str | None) -> None:
    if message:
        sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _on_sigterm(signum, frame) -> None:
    _say(farewell())
    said_why()  # stopped, not silent: a peer that outlives this one adds nothing
    sys.stdout.flush()
    os._exit(128 + signum)
