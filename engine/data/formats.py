"""Users' own data: prompts, demonstrations and comparisons from local JSONL, JSON or Parquet files.

JSON is parsed record by record with the standard library (types stay as written: an integer ranking on
one line is not turned into floats because another line has a float), Parquet with pyarrow. Every record
is checked; a bad one raises DataError naming the file, the line (JSONL, JSON) or row (Parquet) and the
field. Nothing is fetched and nothing in a file is executed.

Formats (one JSON object per line in JSONL; lines end at "\\n" only, so U+2028 inside a string is text):
  prompts         {"prompt": str}                      or {"messages": [{"role", "content"}, ...]}
                  optional "env": {...}, the arguments of the episode's environment (--rollout.env: its reset),
                  and "tools": [name, ...], the functions of --rollout.tools this prompt shows and allows
  demonstrations  {"prompt": str, "completion": str}   or {"messages": [..., {"role": "assistant", ...}]}
  comparisons     {"prompt": str, "chosen": str, "rejected": str}                (pairwise, as in Anthropic HH)
                  {"prompt": str, "responses": [str, ...], "ranking": [int, ...]} (InstructGPT's K-way; ranking
                  lists response indices best first, a permutation of 0..K-1; optional "finished": [bool, ...],
                  false for a response that was cut off before its end: it is scored without an end token)
  texts           {"text": str}                        (PPO-ptx's pretraining data)

`special_tokens`: texts of the tokenizer's special tokens (`engine.data.encode.special_texts`). A record
whose text contains one is refused: the tokenizer would read it as that token, so an end-of-turn marker
inside a completion would cut it there, and one inside a prompt would forge a chat turn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KINDS = ("prompts", "demonstrations", "comparisons", "texts")


class DataError(ValueError):
    pass


@dataclass
class Prompt:
    prompt: str | list[dict]                 # text, or chat messages ending with a user (or tool) turn
    env: dict | None = None                  # keyword arguments of the environment's reset (episodes)
    tools: list[str] | None = None           # names of the --rollout.tools functions it shows (None: all)


@dataclass
class Demonstration:
    prompt: str | list[dict]
    completion: str


@dataclass
class Comparison:
    prompt: str | list[dict]
    responses: list[str]                     # K >= 2
    ranking: list[int]                       # indices into responses, best first
    finished: list[bool] | None = None       # per response; None: all finished (each ends with end-of-turn)


def load(path: str | Path, kind: str, special_tokens: tuple[str, ...] = ()) -> list:
    """Records of `kind` ("prompts" | "demonstrations" | "comparisons" | "texts") from a local file."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    parse = {"prompts": _prompt, "demonstrations": _demonstration, "comparisons": _comparison,
             "texts": lambda r: r.text("text")}[kind]
    out = []
    for row, loc in _read(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{loc}: expected a JSON object, got {_kind(row)}")
        out.append(parse(_Record(row, lambda msg, loc=loc: DataError(f"{path}:{loc}: {msg}"), special_tokens)))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _no_duplicates(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in one object")
        seen[key] = value
    return seen


def _json(text: str):
    return json.loads(text, object_pairs_hook=_no_duplicates)


def _decode(data: bytes, path: Path, loc: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{loc}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte {exc.start + 1} of the "
                        f"line); save the file as UTF-8") from None


def _read(path: Path):
    """Yield (row, location) pairs; a syntax or encoding error names its line."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        data = path.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
            data = data[3:]
        for n, raw in enumerate(data.split(b"\n"), 1):
            text = _decode(raw, path, f"line {n}").strip()
            if not text:
                continue
            try:
                yield _json(text), f"line {n}"
            except ValueError as exc:  # JSONDecodeError, duplicate keys
                what = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise DataError(f"{path}:line {n}: malformed JSON ({what})") from None
        return
    if suffix == ".json":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise DataError(f"{path}:line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as "
                            f"UTF-8") from None
        try:
            doc = _json(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:line {exc.lineno}: malformed JSON ({exc.msg})") from None
        except ValueError as exc:
            raise DataError(f"{path}: malformed JSON ({exc})") from None
        if not isinstance(doc, list):
            raise DataError(f"{path}: a .json file must hold a list of records (use .jsonl for one per line)")
        yield from ((row, f"record {i + 1}") for i, row in enumerate(doc))
        return
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise DataError(f"{path}: not a readable Parquet file ({reason})") from None
        # Parquet columns exist in every row: a field a record does not have is null there, so drop nulls to
        # report it as missing.
        yield from (({k: v for k, v in r.items() if v is not None}, f"row {i + 1}") for i, r in enumerate(rows))
        return
    raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json or .parquet")


@dataclass
class _Record:
    """One row being parsed: typed field access whose errors carry the row's file and line."""
    row: dict
    err: Callable[[str], DataError]
    special_tokens: tuple[str, ...]

    def has(self, field: str) -> bool:
        return field in self.row

    def checked(self, value: str, field: str, *, allow_empty=False) -> str:
        if not isinstance(value, str):
            raise self.err(f"field {field} must be a string, got {_kind(value)}")
        if not allow_empty and not value.strip():
            raise self.err(f"field {field} is empty")
        for token in self.special_tokens:
            if token in value:
                raise self.err(f"field {field} contains {token!r}, a special token of the tokenizer: it would be "
                               f"read as that token (ending or cutting the text there, or forging a chat turn). "
                               f"Remove it from the data")
        return value

    def text(self, field: str) -> str:
        if field not in self.row:
            raise self.err(f"missing field {field!r}")
        return self.checked(self.row[field], repr(field))

    def messages(self) -> list[dict]:
        msgs = self.row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise self.err("field 'messages' must be a non-empty list of {role, content}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise self.err(f"field 'messages'[{i}] must be an object with string 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise self.err(f"field 'messages'[{i}].role must be system, user, assistant or tool, got "
                               f"{m['role']!r}")
            self.checked(m["content"], f"'messages'[{i}].content", allow_empty=True)
        return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _prompt(r: _Record) -> Prompt:
    env = r.row.get("env")
    if env is not None and (not isinstance(env, dict) or not all(isinstance(k, str) and k.isidentifier()
                                                                 for k in env)):
        raise r.err(f"field 'env' must be an object whose keys are argument names (the environment's reset "
                    f"takes them), got {str(env)[:80]}")
    tools = r.row.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, str) and t.isidentifier()
                                                                     for t in tools)):
        raise r.err(f"field 'tools' must be a list of function names (of --rollout.tools), got {str(tools)[:80]}")
    if r.has("messages"):
        msgs = r.messages()
        if msgs[-1]["role"] not in ("user", "tool"):
            raise r.err("field 'messages' of a prompt must end with a user (or tool) turn")
        return Prompt(msgs, env, tools)
    if not r.has("prompt"):
        raise r.err("missing field 'prompt' (or 'messages')")
    return Prompt(r.text("prompt"), env, tools)


def _demonstration(r: _Record) -> Demonstration:
    if r.has("messages"):
        msgs = r.messages()
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise r.err("field 'messages' of a demonstration must end with an assistant turn after a user turn")
        if not msgs[-1]["content"].strip():
            raise r.err(f"field 'messages'[{len(msgs) - 1}].content: the assistant's answer is empty")
        return Demonstration(msgs[:-1], msgs[-1]["content"])
    if not r.has("prompt"):
        raise r.err("missing field 'prompt' (or 'messages')")
    return Demonstration(r.text("prompt"), r.text("completion"))


def _ranking(r: _Record, k: int) -> list[int]:
    ranking = r.row["ranking"]
    want = f"a permutation of 0..{k - 1} (response indices, best first; no ties)"
    if not isinstance(ranking, list):
        raise r.err(f"field 'ranking' must be {want}, got {_kind(ranking)}")
    for i, x in enumerate(ranking):
        if not isinstance(x, int) or isinstance(x, bool):
            raise r.err(f"field 'ranking'[{i}] must be an integer index, got {_kind(x)} {x!r}; 'ranking' must be {want}")
    if sorted(ranking) != list(range(k)):
        raise r.err(f"field 'ranking' must be {want}, got {ranking!r}")
    return list(ranking)


def _finished(r: _Record, k: int) -> list[bool] | None:
    if not r.has("finished"):
        return None
    flags = r.row["finished"]
    if not isinstance(flags, list) or len(flags) != k or not all(isinstance(f, bool) for f in flags):
        raise r.err(f"field 'finished' must be a list of {k} booleans (one per response), got {flags!r}")
    return list(flags)


def _comparison(r: _Record) -> Comparison:
    if r.has("messages"):
        prompt = r.messages()
    elif r.has("prompt"):
        prompt = r.text("prompt")
    else:
        raise r.err("missing field 'prompt'")
    if r.has("responses") or r.has("ranking"):
        responses = r.row.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            raise r.err("field 'responses' must be a list of at least 2 strings")
        for i, text in enumerate(responses):
            r.checked(text, f"'responses'[{i}]")
        if not r.has("ranking"):
            raise r.err("missing field 'ranking' (response indices, best first)")
        return Comparison(prompt, list(responses), _ranking(r, len(responses)), _finished(r, len(responses)))
    return Comparison(prompt, [r.text("chosen"), r.text("rejected")], [0, 1])
