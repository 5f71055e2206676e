"""Users' own data: prompts, demonstrations and comparisons from local JSONL, JSON or Parquet files.

Loaded with the `datasets` library from local paths (nothing is fetched). Every record is checked; a bad
one raises DataError naming the file, the line (JSONL) or record number (JSON, Parquet) and the field.

Formats (one JSON object per line in JSONL):
  prompts         {"prompt": str}                      or {"messages": [{"role", "content"}, ...]}
  demonstrations  {"prompt": str, "completion": str}   or {"messages": [..., {"role": "assistant", ...}]}
  comparisons     {"prompt": str, "chosen": str, "rejected": str}                (pairwise, as in Anthropic HH)
                  {"prompt": str, "responses": [str, ...], "ranking": [int, ...]} (InstructGPT's K-way; ranking
                  lists response indices best first, a permutation of 0..K-1)
  texts           {"text": str}                        (PPO-ptx's pretraining data)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

KINDS = ("prompts", "demonstrations", "comparisons", "texts")


class DataError(ValueError):
    pass


@dataclass
class Prompt:
    prompt: str | list[dict]                 # text, or chat messages ending with a user turn


@dataclass
class Demonstration:
    prompt: str | list[dict]
    completion: str


@dataclass
class Comparison:
    prompt: str | list[dict]
    responses: list[str]                     # K >= 2
    ranking: list[int]                       # indices into responses, best first


def load(path: str | Path, kind: str) -> list:
    """Records of `kind` ("prompts" | "demonstrations" | "comparisons" | "texts") from a local file."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows, where = _read(path)
    parse = {"prompts": _prompt, "demonstrations": _demonstration, "comparisons": _comparison,
             "texts": lambda row, err: _text(row, "text", err)}[kind]
    out = []
    for row, loc in zip(rows, where):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{loc}: expected a JSON object, got {type(row).__name__}")
        out.append(parse(row, lambda msg, loc=loc: DataError(f"{path}:{loc}: {msg}")))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _read(path: Path) -> tuple[list, list[str]]:
    """(rows, location of each row). JSONL is checked line by line first so a syntax error names its line."""
    import datasets

    datasets.disable_progress_bars()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        lines = []
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not text.strip():
                continue
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:line {n}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            lines.append(n)
        rows = _rows(datasets.load_dataset("json", data_files=str(path), split="train")) if lines else []
        return rows, [f"line {n}" for n in lines]
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:line {exc.lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json file must hold a list of records (use .jsonl for one per line)")
        rows = _rows(datasets.load_dataset("json", data_files=str(path), split="train")) if data else []
        return rows, [f"record {i + 1}" for i in range(len(rows))]
    if suffix == ".parquet":
        rows = _rows(datasets.load_dataset("parquet", data_files=str(path), split="train"))
        return rows, [f"row {i + 1}" for i in range(len(rows))]
    raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json or .parquet")


def _rows(ds) -> list[dict]:
    # datasets unifies columns across records (a field missing from a record becomes None): drop those Nones
    # again so a missing field is reported as missing.
    return [{k: v for k, v in r.items() if v is not None} for r in ds]


def _text(row, field, err, *, allow_empty=False) -> str:
    if field not in row:
        raise err(f"missing field {field!r}")
    value = row[field]
    if not isinstance(value, str):
        raise err(f"field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise err(f"field {field!r} is empty")
    return value


def _messages(row, err) -> list[dict]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise err("field 'messages' must be a non-empty list of {role, content}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise err(f"field 'messages'[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise err(f"field 'messages'[{i}].role must be system, user or assistant, got {m['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _prompt(row, err) -> Prompt:
    if "messages" in row:
        msgs = _messages(row, err)
        if msgs[-1]["role"] != "user":
            raise err("field 'messages' of a prompt must end with a user turn")
        return Prompt(msgs)
    if "prompt" not in row:
        raise err("missing field 'prompt' (or 'messages')")
    return Prompt(_text(row, "prompt", err))


def _demonstration(row, err) -> Demonstration:
    if "messages" in row:
        msgs = _messages(row, err)
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise err("field 'messages' of a demonstration must end with an assistant turn after a user turn")
        if not msgs[-1]["content"].strip():
            raise err("field 'messages': the assistant's answer is empty")
        return Demonstration(msgs[:-1], msgs[-1]["content"])
    if "prompt" not in row:
        raise err("missing field 'prompt' (or 'messages')")
    return Demonstration(_text(row, "prompt", err), _text(row, "completion", err))


def _comparison(row, err) -> Comparison:
    prompt = _messages(row, err) if "messages" in row else (
        _text(row, "prompt", err) if "prompt" in row else None)
    if prompt is None:
        raise err("missing field 'prompt'")
    if "responses" in row or "ranking" in row:
        responses = row.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            raise err("field 'responses' must be a list of at least 2 strings")
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise err(f"field 'responses'[{i}] must be a string, got {type(r).__name__}")
            if not r.strip():
                raise err(f"field 'responses'[{i}] is empty")
        if "ranking" not in row:
            raise err("missing field 'ranking' (response indices, best first)")
        ranking = row["ranking"]
        if not isinstance(ranking, list) or sorted(ranking) != list(range(len(responses))) or \
                not all(isinstance(x, int) for x in ranking):
            raise err(f"field 'ranking' must be a permutation of 0..{len(responses) - 1} (best first), got {ranking!r}")
        return Comparison(prompt, list(responses), list(ranking))
    chosen, rejected = _text(row, "chosen", err), _text(row, "rejected", err)
    return Comparison(prompt, [chosen, rejected], [0, 1])
