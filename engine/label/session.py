"""A labeling session: one folder holding what the app serves and everything it was told, nothing else.

    session.json      the settings: kind ("rank" or "compare"), metadata flags, overlap, seed, where the
                      answers came from
    items.jsonl       the items, written once: to rank {"id", "prompt", "responses", "finished"}; to compare
                      blind {"id", "prompt", "policies": [a, b], "responses": [a's, b's], "finished"}
    tokens.json       (mode 0600) the admin's token and one secret token per labeler
    comparisons.jsonl every ranking submitted, in the engine's K-way comparisons format plus who, when, the
                      ratings and flags (`python -m engine rm --data.comparisons` reads it as it is)
    judgments.jsonl   every blind A/B verdict: the two policies, the winner's name or null for a tie
    skips.jsonl       every item a labeler skipped

Which labeler gets which item is a function of the seed, the item and the labelers' names, so a restarted
server hands out the same work, and what is done is what the two logs hold: nothing else is state.
"""
from __future__ import annotations

import hmac
import json
import os
import re
import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..seeds import derive_seed
from .store import LogError, SubmissionLog, read_regular

FLAGS = ("fails to follow the instruction", "made-up facts", "inappropriate for a customer assistant",
         "sexual or violent content", "harmful advice")  # InstructGPT's metadata (Table 3)
RATINGS = range(1, 8)                                    # the 1-7 Likert scale
MAX_ID = 64
ID = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_ID}}}")  # what a page makes (a UUID); never a control character
ANSWER = ("labeler", "item", "ranking", "ratings", "flags", "winner")  # what a resend must repeat to be one


class SessionError(ValueError):
    """A session folder that cannot be used as it is; the message names the file and what to do."""


def _text(path: Path) -> str:
    """A session file's text: a regular file of the folder's own, UTF-8."""
    if not path.exists() and not path.is_symlink():
        raise SessionError(f"{path}: missing; make the session with `python -m engine label rank ...` (or "
                           f"compare) first, or give the folder that holds it")
    try:
        return read_regular(path, "a session file").decode("utf-8")
    except LogError as exc:
        raise SessionError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise SessionError(f"{path}: not UTF-8 text (byte {exc.start}); the file is damaged: restore it from a copy "
                           f"or make the session again") from None


def _parse(text: str, path: Path, line: int | None = None):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        where = f"{path}, line {line}" if line else str(path)
        raise SessionError(f"{where}: not JSON ({getattr(exc, 'msg', type(exc).__name__)}); the file is damaged: "
                           f"restore it from a copy or make the session again") from None


def _json(path: Path, kind: type):
    value = _parse(_text(path), path)
    if not isinstance(value, kind):
        raise SessionError(f"{path}: must hold a JSON {kind.__name__}; restore it or make the session again")
    return value


class SubmissionError(ValueError):
    """A submission the server refuses: `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def create_session(folder: str | Path, items: list[dict], labelers: list[str], *, kind: str = "rank", flags=FLAGS,
                   overlap: float = 0.0, per_shared: int = 2, seed: int = 0, source: dict | None = None) -> Path:
    """Write a new session folder. items (kind "rank"): {"prompt", "responses", "finished"?}; (kind
    "compare"): {"prompt", "policies": [a, b], "responses": [a's, b's]}. labelers: names (letters, digits,
    '-', '_'). overlap: the share of items given to `per_shared` labelers instead of one (for agreement).
    source: what produced the responses (policies, sampling settings), copied into every record."""
    if kind not in ("rank", "compare"):
        raise ValueError(f"kind must be rank or compare, got {kind!r}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} already holds files; a session folder must be new or empty")
    if not labelers or len(set(labelers)) != len(labelers):
        raise ValueError(f"give one or more distinct labeler names, got {labelers!r}")
    for name in labelers:
        if not name or not all(c.isalnum() or c in "-_" for c in name) or len(name) > 40:
            raise ValueError(f"labeler name {name!r}: use 1-40 letters, digits, '-' or '_'")
    flags = list(flags)
    if len(set(flags)) != len(flags) or not all(isinstance(f, str) and 0 < len(f) <= 80 for f in flags):
        raise ValueError(f"flags must be distinct texts of 1-80 characters, got {flags!r}")
    if not 0 <= overlap <= 1:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    if overlap > 0 and not 2 <= per_shared <= len(labelers):
        raise ValueError(f"per_shared must be between 2 and the number of labelers ({len(labelers)}), got "
                         f"{per_shared}")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, item in enumerate(items):
        k = len(item["responses"])
        row = {"id": f"item-{i:06d}", "prompt": item["prompt"], "responses": list(item["responses"])}
        if "rm_spread" in item:  # items come in the order to label them (engine/label/uncertain.py)
            row["rm_spread"] = item["rm_spread"]
        if kind == "rank":
            if k < 2:
                raise ValueError(f"item {i}: a ranking needs at least 2 responses, got {k}")
            row["finished"] = list(item.get("finished") or [True] * k)
        else:
            pols = list(item["policies"])
            if k != 2 or len(pols) != 2 or pols[0] == pols[1]:
                raise ValueError(f"item {i}: a blind comparison shows two different policies' answers, got "
                                 f"{pols} with {k} responses")
            row["policies"] = pols
            row["finished"] = list(item.get("finished") or [True] * k)
        rows.append(row)
    settings = {"kind": kind, "flags": list(flags), "overlap": overlap, "per_shared": per_shared, "seed": seed,
                "labelers": list(labelers), "source": source or {}}
    (folder / "items.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (folder / "session.json").write_text(json.dumps(settings, indent=2))
    tokens = {"admin": secrets.token_urlsafe(24), "labelers": {n: secrets.token_urlsafe(24) for n in labelers}}
    _write_private(folder / "tokens.json", json.dumps(tokens, indent=2))
    return folder


@dataclass
class Session:
    folder: Path
    settings: dict
    items: dict[str, dict]
    tokens: dict
    comparisons: SubmissionLog
    skips: SubmissionLog
    judgments: SubmissionLog
    _labeled: dict[str, set] = field(default_factory=dict)      # labeler -> items ranked or judged
    _skipped: dict[str, Counter] = field(default_factory=dict)  # labeler -> item -> times skipped
    _assignments: dict[str, list[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, folder: str | Path, *, write: bool = True) -> "Session":
        """The session in `folder`. write: for a server, which appends to the logs and repairs a torn last line
        (hold the folder's lock first: `serve.py`); False to read only (`label report`: nothing on disk changes).
        Every file is checked as it is read; a damaged one is a SessionError naming it and what to do."""
        folder = Path(folder)
        settings = _json(folder / "session.json", dict)
        for key, kind, what in (("kind", str, "text"), ("flags", list, "list"), ("labelers", list, "list"),
                                ("seed", int, "whole number"), ("overlap", (int, float), "number"),
                                ("per_shared", int, "whole number")):
            if not isinstance(settings.get(key), kind) or isinstance(settings.get(key), bool):
                raise SessionError(f"{folder / 'session.json'}: {key!r} is missing or not a {what}; the file was "
                                   f"changed by hand? Restore it, or make the session again")
        if settings["kind"] not in ("rank", "compare"):
            raise SessionError(f"{folder / 'session.json'}: kind must be rank or compare, got {settings['kind']!r}")
        items = {}
        text = _text(folder / "items.jsonl")
        for n, line in enumerate(text.splitlines(), 1):
            row = _parse(line, folder / "items.jsonl", n)
            if not (isinstance(row, dict) and isinstance(row.get("id"), str) and "prompt" in row
                    and isinstance(row.get("responses"), list) and row["responses"]
                    and all(isinstance(r, str) for r in row["responses"])):
                raise SessionError(f"{folder / 'items.jsonl'}, line {n}: an item is an object with a string 'id', a "
                                   f"'prompt' and a list of 'responses'; restore the file or make the session again")
            items[row["id"]] = row
        tokens = _json(folder / "tokens.json", dict)
        if not (isinstance(tokens.get("admin"), str) and isinstance(tokens.get("labelers"), dict)
                and all(isinstance(t, str) for t in tokens["labelers"].values())):
            raise SessionError(f"{folder / 'tokens.json'}: must hold the admin's token and one per labeler; restore "
                               f"it or make the session again")
        try:
            logs = [SubmissionLog(folder / name, write=write)
                    for name in ("comparisons.jsonl", "skips.jsonl", "judgments.jsonl")]
        except LogError as exc:
            raise SessionError(str(exc)) from None
        s = cls(folder, settings, items, tokens, *logs)
        for log in logs:
            for record in log.records:
                who, item = record.get("labeler"), record.get("item")
                if not isinstance(who, str) or not isinstance(item, str):
                    raise SessionError(f"{log.path}: the record {record['id']!r} has no labeler or item; the log was "
                                       f"changed by hand? Remove or repair that line")
                if log is s.skips:
                    s._skipped.setdefault(who, Counter())[item] += 1
                else:
                    s._labeled.setdefault(who, set()).add(item)
        return s

    # ------------------------------------------------------------------ who is asking, and what is theirs
    def labeler(self, token: str | None) -> str | None:
        """The labeler whose token this is, or None (compared in constant time)."""
        found = None
        for name, secret in self.tokens["labelers"].items():
            if token is not None and hmac.compare_digest(token.encode(), secret.encode()):
                found = name
        return found

    def is_admin(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.tokens["admin"].encode())

    def assigned(self, item_id: str) -> list[str]:
        """The labelers an item goes to: one, or `per_shared` for the overlapping share (a function of the
        settings alone, worked out once per item: every request asks)."""
        names = self._assignments.get(item_id)
        if names is None:
            s = self.settings
            names = sorted(s["labelers"], key=lambda n: derive_seed(s["seed"], "assign", item_id, n))
            shared = derive_seed(s["seed"], "shared", item_id) / 2**63 < s["overlap"]
            names = self._assignments[item_id] = names[:s["per_shared"] if shared else 1]
        return names

    def queue(self, name: str) -> list[str]:
        """The labeler's items not ranked or judged yet: those never skipped first, then those skipped once (a
        skipped item comes back once, at the end; skipped again, it is gone)."""
        done, skipped = self._labeled.get(name, set()), self._skipped.get(name, Counter())
        mine = [i for i in self.items if name in self.assigned(i) and i not in done]
        return [i for i in mine if not skipped[i]] + [i for i in mine if skipped[i] == 1]

    def order(self, name: str, item_id: str) -> list[int]:
        """The order a labeler sees an item's responses in (position p shows response order[p]): shuffled per
        labeler and item, so no response is first for everyone."""
        k = len(self.items[item_id]["responses"])
        return sorted(range(k), key=lambda j: derive_seed(self.settings["seed"], "order", name, item_id, j))

    def next_item(self, name: str) -> dict | None:
        queue = self.queue(name)
        if not queue:
            return None
        item = self.items[queue[0]]
        order = self.order(name, item["id"])
        finished = item.get("finished") or [True] * len(order)
        return {"item": item["id"], "kind": self.settings["kind"], "prompt": item["prompt"],
                "responses": [item["responses"][j] for j in order], "finished": [finished[j] for j in order],
                "flags": self.settings["flags"], "remaining": len(queue)}  # never which policy wrote which

    # ------------------------------------------------------------------ submissions
    def submit(self, name: str, body: dict) -> bool:
        """Save a ranking: body {"id", "item", "ranking": display positions best first, "ratings": [1-7 per
        position], "flags": [[flag, ...] per position], "seconds"}. True when new, False when this id was
        already saved (a resend). SubmissionError for anything else."""
        sid, item = self._common(name, body)
        if self.settings["kind"] == "compare":
            return self._judge(name, sid, item, body)
        k = len(item["responses"])
        ranking = body.get("ranking")
        if not isinstance(ranking, list) or not all(type(x) is int for x in ranking) or sorted(ranking) != list(range(k)):
            raise SubmissionError(f"'ranking' must list the {k} shown positions best first (a permutation of "
                                  f"0..{k - 1}), got {ranking!r}")
        ratings = body.get("ratings")
        if not isinstance(ratings, list) or len(ratings) != k or not all(
                isinstance(r, int) and not isinstance(r, bool) and r in RATINGS for r in ratings):
            raise SubmissionError(f"'ratings' must give each of the {k} responses an integer from 1 to 7")
        flags = body.get("flags", [[] for _ in range(k)])
        allowed = set(self.settings["flags"])
        if not isinstance(flags, list) or len(flags) != k or not all(
                isinstance(f, list) and all(isinstance(x, str) and x in allowed for x in f) for f in flags):
            raise SubmissionError(f"'flags' must be {k} lists of flags among {sorted(allowed)}")
        order = self.order(name, item["id"])
        by_response = {order[p]: p for p in range(k)}  # response index -> the position it was shown at
        record = {"id": sid, "item": item["id"], "prompt": item["prompt"], "responses": item["responses"],
                  "ranking": [order[p] for p in ranking], "finished": item["finished"], "labeler": name,
                  "time": _now(), "seconds": _seconds(body), "ratings": [ratings[by_response[j]] for j in range(k)],
                  "flags": [sorted(set(flags[by_response[j]])) for j in range(k)], "source": self.settings["source"]}
        return self._save(self.comparisons, name, record, body.get("corrects"))

    def _judge(self, name: str, sid: str, item: dict, body: dict) -> bool:
        """A blind verdict: body["choice"] is the shown position (0 left, 1 right) of the better answer, or
        "tie"."""
        choice = body.get("choice")
        if not (choice == "tie" if isinstance(choice, str) else type(choice) is int and choice in (0, 1)):
            raise SubmissionError(f"'choice' must be 0 (the left answer is better), 1 (the right one) or \"tie\", "
                                  f"got {choice!r}")
        order = self.order(name, item["id"])
        winner = None if choice == "tie" else item["policies"][order[choice]]
        record = {"id": sid, "item": item["id"], "prompt": item["prompt"], "policies": item["policies"],
                  "responses": item["responses"], "winner": winner, "labeler": name, "time": _now(),
                  "seconds": _seconds(body), "source": self.settings["source"]}
        return self._save(self.judgments, name, record, body.get("corrects"))

    def skip(self, name: str, body: dict) -> bool:
        sid, item = self._common(name, body)
        return self._save(self.skips, name, {"id": sid, "item": item["id"], "labeler": name, "time": _now(),
                                             "seconds": _seconds(body)})

    def _common(self, name: str, body: dict) -> tuple[str, dict]:
        sid = body.get("id")
        if not isinstance(sid, str) or not ID.fullmatch(sid):
            raise SubmissionError(f"'id' must be 1 to {MAX_ID} letters, digits, '-', '_', '.' or ':' (one per "
                                  f"submission, the same when resent)")
        item = body.get("item")
        item = self.items.get(item) if isinstance(item, str) else None
        if item is None or name not in self.assigned(item["id"]):
            shown = body.get("item") if isinstance(body.get("item"), str) else type(body.get("item")).__name__
            raise SubmissionError(f"item {str(shown)[:80]!r} is not one of yours: reload the page for your next item",
                                  404)
        return sid, item

    def _save(self, log: SubmissionLog, name: str, record: dict, corrects=None) -> bool:
        """Store `record` once. corrects: the id of this labeler's saved answer on the same item, which the
        record replaces in the log (an undo: the item keeps exactly one record)."""
        item = record["item"]
        with self._lock:
            saved = log.by_id.get(record["id"])
            if saved is not None:
                if any(saved.get(k) != record.get(k) for k in ANSWER):
                    raise SubmissionError(f"the id {record['id']!r} was saved with another answer; a new submission "
                                          f"needs a new id (reload the page)", 409)
                return False  # a resend of what is saved: acknowledged again, stored once
            if corrects is not None:
                old = log.by_id.get(corrects) if isinstance(corrects, str) else None
                if old is None or old.get("labeler") != name or old.get("item") != item:
                    raise SubmissionError(f"'corrects' must name your saved answer on {item} (got "
                                          f"{str(corrects)[:80]!r}); reload the page and submit it as a new answer", 409)
                log.replace(corrects, record)
                return True
            if item in self._labeled.get(name, set()):
                raise SubmissionError(f"you already submitted {item}; to change your answer press Undo (U) right "
                                      f"after submitting, or reload the page for your next item", 409)
            if log is self.skips and item not in self.queue(name):
                raise SubmissionError(f"{item} was skipped twice already and is out of your queue; reload the page "
                                      f"for your next item", 409)
            log.append(record)
            if log is self.skips:
                self._skipped.setdefault(name, Counter())[item] += 1
            else:
                self._labeled.setdefault(name, set()).add(item)
            return True

    def progress(self) -> dict:
        names = self.settings["labelers"]
        total = {n: sum(n in self.assigned(i) for i in self.items) for n in names}
        ranked = {n: 0 for n in names}
        skipped = {n: 0 for n in names}
        for r in self.comparisons.records + self.judgments.records:
            ranked[r["labeler"]] += 1
        for r in self.skips.records:
            skipped[r["labeler"]] += 1
        return {"items": len(self.items), "labelers": {n: {"assigned": total[n], "labeled": ranked[n],
                                                           "skipped": skipped[n]} for n in names}}

    def close(self) -> None:
        for log in (self.comparisons, self.skips, self.judgments):
            log.close()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _seconds(body: dict):
    s = body.get("seconds")
    return float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1e6 else None
