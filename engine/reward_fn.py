"""Rewards beyond a reward model: a Python function named on the command line (`--reward.fn pkg.mod:fn`).

The function takes two lists of texts, the prompts (a chat prompt is given as its last user message) and the
sampled answers (decoded up to their end), and returns one float per answer: a verifiable reward (an exact
answer, a passing test, a format check) or anything else a user can compute from text. It is imported from
the user's own environment, as named: nothing is loaded from a run directory.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

import torch


def load_reward_fn(spec: str) -> Callable:
    """The function `spec` ("package.module:function") names, or a ValueError saying why not."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--reward.fn {spec}: cannot import {module_name!r} ({exc}); is it installed or on "
                         f"PYTHONPATH?") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward.fn {spec}: {module_name} has no function {name!r}")
    return fn


def prompt_text(prompt) -> str:
    """A record's prompt as the text a reward function sees: itself, or a chat's last user message."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def call_reward_fn(fn: Callable, spec: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """fn(prompts, responses) as float32 [B], every failure an error that names the function."""
    try:
        out = fn(list(prompts), list(responses))
    except Exception as exc:  # noqa: BLE001 - the user's code: any error is reported with its name
        raise ValueError(f"--reward.fn {spec} raised {type(exc).__name__}: {exc}") from exc
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise ValueError(f"--reward.fn {spec} must return a list of floats, one per response; got "
                         f"{type(out).__name__}") from None
    if len(values) != len(responses):
        raise ValueError(f"--reward.fn {spec} returned {len(values)} values for {len(responses)} responses; it "
                         f"must return one per response")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"--reward.fn {spec} returned {values[bad[0]]} for response {bad[0]} "
                         f"({responses[bad[0]][:60]!r}); rewards must be finite")
    return torch.tensor(values, dtype=torch.float32)
