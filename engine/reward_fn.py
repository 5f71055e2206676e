"""Rewards beyond a reward model: a Python function named on the command line (`--reward.fn pkg.mod:fn`).

The function takes two lists of texts, the prompts (a chat prompt is given as its last user message) and the
sampled answers (decoded up to their end), and returns one float per answer: a verifiable reward (an exact
answer, a passing test, a format check) or anything else a user can compute from text. It is imported from
the user's own environment, as named: nothing is loaded from a run directory.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Callable

import torch

from .user_code import REWARD_LIMIT, import_named


def load_reward_fn(spec: str, flag: str = "--reward.fn") -> Callable:
    """The function `spec` ("package.module:function") names, or a ValueError saying why not."""
    module, name = import_named(spec, flag)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{flag} {spec}: {module.__name__} has no function {name!r}")
    return fn


def prompt_text(prompt) -> str:
    """A record's prompt as the text a reward function sees: itself, or a chat's last user message."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")




def _values(out, spec: str, n: int, flag: str) -> list:
    """The function's result as a list of n elements, or a ValueError saying what it returned instead."""
    if isinstance(out, torch.Tensor) or type(out).__module__ == "numpy" and hasattr(out, "ndim"):
        if out.ndim != 1:
            raise ValueError(f"{flag} {spec} returned an array of shape {tuple(out.shape)}; it must return "
                             f"one number per response ({n})")
        out = out.tolist()
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
        raise ValueError(f"{flag} {spec} returned a {type(out).__name__}; it must return a list (or tuple, or "
                         f"1-D array) of numbers, one per response ({n})")
    if len(out) != n:
        raise ValueError(f"{flag} {spec} returned {len(out)} values for {n} responses; it must return one per "
                         f"response")
    return list(out)


def call_reward_fn(fn: Callable, spec: str, prompts: list[str], responses: list[str],
                   flag: str = "--reward.fn") -> torch.Tensor:
    """fn(prompts, responses) as float32 [B]. The result must be a sequence of B real numbers (not strings, not
    a dict), each finite and at most REWARD_LIMIT in magnitude; anything else, and any exception the function
    raises (SystemExit included), is a ValueError that names the function."""
    try:
        out = fn(list(prompts), list(responses))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code: any error is reported with its name
        raise ValueError(f"{flag} {spec} raised {type(exc).__name__}: {exc}") from exc
    values = _values(out, spec, len(responses), flag)
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):
            raise ValueError(f"{flag} {spec} returned {v!r} ({type(v).__name__}) for response {i} "
                             f"({responses[i][:60]!r}); each reward must be a number")
        v = float(v)
        if not math.isfinite(v) or abs(v) > REWARD_LIMIT:
            raise ValueError(f"{flag} {spec} returned {v} for response {i} ({responses[i][:60]!r}); rewards "
                             f"must be finite and at most {REWARD_LIMIT:g} in magnitude (the trainer sums and squares "
                             f"them in float32)")
        values[i] = v
    return torch.tensor(values, dtype=torch.float32)
