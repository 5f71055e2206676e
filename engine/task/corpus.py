"""A short pretraining corpus over the task's vocabulary: plain text, no instructions.

It carries what instruction following later needs (counting, repetition, each noun's colour) and the
plain language whose loss measures the alignment tax.
"""
from __future__ import annotations

import random

from .vocab import ADJECTIVES, COLORS, NOUN_COLOR, NOUNS, NUMBERS


def sentence(rng: random.Random) -> str:
    kind = rng.random()
    noun, other = rng.sample(NOUNS, 2)
    if kind < 0.25:
        return f"the {noun} is {NOUN_COLOR[noun]} ."
    if kind < 0.40:
        n = rng.randint(2, 9)
        return " ".join(NUMBERS[:n]) + " ."
    if kind < 0.50:
        n = rng.randint(2, 6)
        return f"{NUMBERS[n - 1]} times {noun} is " + " ".join([noun] * n) + " ."
    if kind < 0.65:
        return f"the {rng.choice(ADJECTIVES)} {noun} is on the {other} ."
    if kind < 0.75:
        return f"a {noun} and a {other} ."
    if kind < 0.85:
        items = rng.sample(NOUNS, rng.randint(2, 4))
        return " ".join(items) + " then " + " ".join(reversed(items)) + " ."
    if kind < 0.93:
        return f"it was a {rng.choice(ADJECTIVES)} {rng.choice(COLORS)} {noun} ."
    return f"i see the {noun} with the {other} ."


def make_corpus(n: int, rng: random.Random) -> list[str]:
    return [sentence(rng) for _ in range(n)]
