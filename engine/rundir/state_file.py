"""Trainer state (optimizer, scheduler, step, RNG streams) in files that cannot carry code.

A checkpoint's state is a tree of dicts, lists, tuples, numbers, strings, None and tensors (what
`optimizer.state_dict()` returns, plus our scalars). It is written as two files:

    trainer.safetensors   every tensor, under the names t0, t1, ...
    trainer.json          the tree, with {"$tensor": "t0"} where a tensor was

Reading them is `json.loads` and `safetensors.load_file`: neither can run code, whatever the files hold,
unlike a pickle (`torch.save`), which a run directory received from someone else could turn into a shell
command. Tuples and dicts with non-string keys (optimizer states are keyed by parameter index) are kept
as {"$tuple": [...]} and {"$items": [[key, value], ...]} so that the tree comes back exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

FORMAT = "rlhf-engine trainer state"
VERSION = 1
JSON_NAME, TENSORS_NAME = "trainer.json", "trainer.safetensors"


class StateFileError(ValueError):
    pass


def _encode(x, tensors: dict):
    if isinstance(x, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = x.detach().cpu().contiguous()
        return {"$tensor": name}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, tuple):
        return {"$tuple": [_encode(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_encode(v, tensors) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _encode(v, tensors) for k, v in x.items()}
        for k in x:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"trainer state: a dict key must be a str or an int, got {type(k).__name__}")
        return {"$items": [[k, _encode(v, tensors)] for k, v in x.items()]}
    raise TypeError(f"trainer state: cannot store a {type(x).__name__} (only tensors, numbers, strings, None, "
                    f"lists, tuples and dicts)")


def _decode(x, tensors: dict, where: Path):
    if isinstance(x, list):
        return [_decode(v, tensors, where) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) == 1:
        (key, value), = x.items()
        if key == "$tensor":
            if value not in tensors:
                raise StateFileError(f"{where}: names a tensor {value!r} that {TENSORS_NAME} does not hold")
            return tensors[value]
        if key == "$tuple":
            return tuple(_decode(v, tensors, where) for v in value)
        if key == "$items":
            return {k: _decode(v, tensors, where) for k, v in value}
    if any(k.startswith("$") for k in x):
        raise StateFileError(f"{where}: unknown entry {sorted(x)!r}")
    return {k: _decode(v, tensors, where) for k, v in x.items()}


def write_state(directory: Path, state: dict) -> None:
    """Write `state` as trainer.json + trainer.safetensors in `directory` (which the caller renames into
    place, so the two files appear together)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    tree = _encode(state, tensors)
    save_file(tensors, str(directory / TENSORS_NAME))
    (directory / JSON_NAME).write_text(json.dumps({"format": FORMAT, "version": VERSION, "state": tree}))


def has_state(directory: Path) -> bool:
    return (directory / JSON_NAME).is_file() and (directory / TENSORS_NAME).is_file()


def read_state(directory: Path) -> dict:
    """The state `write_state` wrote; a StateFileError naming the file when it is damaged or foreign."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / JSON_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise StateFileError(f"{path}: not a readable trainer state ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateFileError(f"{path}: not an rlhf-engine trainer state")
    if doc.get("version") != VERSION:
        raise StateFileError(f"{path}: trainer state version {doc.get('version')!r}; this rlhf-engine reads "
                             f"version {VERSION} (upgrade rlhf-engine to resume this run)")
    try:
        tensors = load_file(str(directory / TENSORS_NAME))
    except (SafetensorError, OSError) as exc:
        raise StateFileError(f"{directory / TENSORS_NAME}: unreadable ({exc})") from None
    try:
        return _decode(doc["state"], tensors, path)
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        if isinstance(exc, StateFileError):
            raise
        raise StateFileError(f"{path}: malformed trainer state ({exc})") from None
