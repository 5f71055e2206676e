"""An append-only JSONL log that says "saved" only once a record is on disk, and holds each record once.

Every record carries an "id" chosen by the client (a page makes one per submission and resends the same id
until the server acknowledges it). `append` writes the line, flushes it and fsyncs the file before it
returns, so a server killed at any moment (kill -9, power loss after the fsync) keeps every record it
acknowledged; a record whose id is already in the log is acknowledged again without a second copy, so a
client that never heard the first acknowledgement can safely resend (`same`: whether a resend says what the
saved record says).

A log opened for writing (one server at a time holds the session: engine/label/session.py) repairs its end: a
last line that a kill cut in the middle of a write (not a whole JSON record) is cut off (it was never
acknowledged), and a whole last record that only lacks its newline is kept and given one. A log opened to
read (`label report`) changes nothing: it leaves a torn line alone and reads what is whole. Only a regular
file is read: a link, a FIFO or a device in its place is refused before it is opened for reading.
"""
from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

from ..rundir.atomic import write_text_atomic


class LogError(ValueError):
    pass


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def read_regular(path: Path, what: str) -> bytes:
    """The bytes of `path`, which must be a regular file of its own (not a link, FIFO, device or folder: a
    FIFO would block the read forever, a link could lead anywhere). LogError naming it and `what` it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if path.is_symlink():
            raise LogError(f"{path} is a symbolic link; {what} must be a regular file in the session folder. "
                           f"Replace the link with the file itself") from None
        raise LogError(f"{path}: cannot read {what} ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LogError(f"{path} is not a regular file (a FIFO, device or folder); {what} must be a regular "
                           f"file in the session folder. Remove it, or restore the file from a copy")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class SubmissionLog:
    def __init__(self, path: str | Path, *, write: bool = True):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.records: list[dict] = []
        self.by_id: dict[str, dict] = {}
        self._file = None
        self._recover(write)
        if write:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
            self._file = os.fdopen(fd, "a", encoding="utf-8")

    def _recover(self, write: bool) -> None:
        if not self.path.exists() and not self.path.is_symlink():
            if write:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            return
        data = read_regular(self.path, "a submission log")
        end = data.rfind(b"\n") + 1
        tail = data[end:]
        whole = tail and self._record(tail, None) is not None  # a whole record without its newline
        if write and tail:
            with os.fdopen(os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC), "r+b") as f:
                if whole:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:  # a torn, unacknowledged write: never told anyone "saved"
                    f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        lines = data[:end].split(b"\n")[:-1] + ([tail] if whole else [])
        for n, line in enumerate(lines, 1):
            record = self._record(line, n)
            if record["id"] not in self.by_id:
                self.by_id[record["id"]] = record
                self.records.append(record)

    def _record(self, line: bytes, n: int | None) -> dict | None:
        """Line n's record; with n None (the unterminated last line), None where it is not a whole record."""
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            if n is None:
                return None
            why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "not JSON"
            raise LogError(f"{self.path}, line {n}: {why}; the log was changed by hand? Remove or repair that "
                           f"line") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            if n is None:
                return None
            raise LogError(f"{self.path}, line {n}: a record must be a JSON object with a string 'id'; remove or "
                           f"repair that line")
        return record

    def append(self, record: dict) -> bool:
        """Write `record` (a JSON object with a string "id") durably; False when its id was already saved."""
        line = _line(record)
        with self._lock:
            if record["id"] in self.by_id:
                return False
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.by_id[record["id"]] = record
            self.records.append(record)
            return True

    def replace(self, old_id: str, record: dict) -> None:
        """`record` in place of the record `old_id` (a correction: the labeler undid that answer), durably: the
        whole log is written beside itself, fsynced and renamed over it (engine.rundir.atomic), so a kill leaves
        the old or the new log, never a mix. The old id is forgotten (a late resend of it is then refused as an
        item already done)."""
        with self._lock:
            records = [record if r["id"] == old_id else r for r in self.records]
            write_text_atomic(self.path, "".join(map(_line, records)))
            self._file.close()  # the old file is unlinked: append to the new one
            self._file = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC),
                                   "a", encoding="utf-8")
            del self.by_id[old_id]
            self.by_id[record["id"]] = record
            self.records = records

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
