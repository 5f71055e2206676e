"""The built-in task's verifiable reward: `--reward.fn engine.task.rewards:exact_answer`.

Every instruction of the task has one correct core answer ("count to three" -> "one two three"), so an
answer can be checked without a reward model or a labeler: 1.0 when its core (opener and trailing words
aside) is exactly the target, else 0.0. It rewards correctness alone, none of the labelers' other tastes
(a polite opener, a full stop, no rambling).
"""
from __future__ import annotations

from .instructions import features, parse_instruction


def exact_answer(prompts: list[str], responses: list[str]) -> list[float]:
    """(prompts, responses) -> 1.0 for an exactly correct answer, 0.0 otherwise (unparseable prompts: 0.0)."""
    out = []
    for prompt, response in zip(prompts, responses):
        inst = parse_instruction(prompt)
        out.append(features(inst, response)["exact"] if inst is not None else 0.0)
    return out
