"""An append-only JSONL log that says "saved" only once a record is on disk, and holds each record once.

Every record carries an "id" chosen by the client (a page makes one per submission and resends the same id
until the server acknowledges it). `append` writes the line, flushes it and fsyncs the file before it
returns, so a server killed at any moment (kill -9, power loss after the fsync) keeps every record it
acknowledged; a record whose id is already in the log is acknowledged again without a second copy, so a
client that never heard the first acknowledgement can safely resend. Opening a log whose last line was torn
by a kill in the middle of a write cuts that partial line off (it was never acknowledged) and makes sure
the file ends with a newline.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class LogError(ValueError):
    pass


class SubmissionLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.records: list[dict] = []
        self.ids: set[str] = set()
        self._recover()
        self._file = open(self.path, "a", encoding="utf-8")

    def _recover(self) -> None:
        if self.path.is_symlink():
            raise LogError(f"{self.path} is a symbolic link; the log must be a regular file in the session folder")
        if not self.path.exists():
            self.path.touch(mode=0o600)
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn, unacknowledged write
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for n, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LogError(f"{self.path}, line {n}: not JSON ({exc.msg}); the log was changed by hand? "
                               f"Remove or repair that line") from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise LogError(f"{self.path}, line {n}: a record must be a JSON object with a string 'id'")
            if record["id"] not in self.ids:
                self.ids.add(record["id"])
                self.records.append(record)

    def append(self, record: dict) -> bool:
        """Write `record` (a JSON object with a string "id") durably; False when its id was already saved."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            if record["id"] in self.ids:
                return False
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.ids.add(record["id"])
            self.records.append(record)
            return True

    def close(self) -> None:
        with self._lock:
            self._file.close()
