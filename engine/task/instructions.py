"""Instructions with checkable intent, and the parser that scores any response against that intent.

Four instruction families, each with one correct core answer:
  repeat  "repeat cat three times"        -> "cat cat cat"
  count   "count to four"                  -> "one two three four"
  reverse "reverse cat dog sun"            -> "sun dog cat"
  color   "what color is the apple"        -> "the apple is red"   (needs pretraining knowledge)
A response is  [opener ","] core ["."] [extra words] <eos>; `features` measures every part, so labelers
can judge what a policy writes, however malformed.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .vocab import NOUN_COLOR, NOUNS, NUMBERS

FAMILIES = ("repeat", "count", "reverse", "color")
OPENERS = ("sure", "ok", "um")
EXTRA_WORDS = ("hmm", "ok", "done", "then")


@dataclass(frozen=True)
class Instruction:
    family: str
    prompt: str          # the words the model sees
    target: tuple        # the correct core answer, as words


def sample_instruction(rng: random.Random) -> Instruction:
    family = rng.choice(FAMILIES)
    if family == "repeat":
        noun, n = rng.choice(NOUNS), rng.randint(2, 6)
        form = rng.choice(["repeat {w} {n} times", "please say {w} {n} times", "say {w} {n} times"])
        return Instruction(family, form.format(w=noun, n=NUMBERS[n - 1]), (noun,) * n)
    if family == "count":
        n = rng.randint(2, 8)
        form = rng.choice(["count to {n}", "please count to {n}", "count from one to {n}"])
        return Instruction(family, form.format(n=NUMBERS[n - 1]), tuple(NUMBERS[:n]))
    if family == "reverse":
        items = rng.sample(NOUNS, rng.randint(2, 4))
        form = rng.choice(["reverse {w}", "please reverse {w}", "reverse the words {w}"])
        return Instruction(family, form.format(w=" ".join(items)), tuple(reversed(items)))
    noun = rng.choice(NOUNS)
    form = rng.choice(["what color is the {w} ?", "tell me the color of the {w}", "what is the color of the {w} ?"])
    return Instruction(family, form.format(w=noun), ("the", noun, "is", NOUN_COLOR[noun]))


_FORMS = (  # (family, pattern) of every form sample_instruction writes; "reverse the words" before "reverse"
    ("repeat", re.compile(r"(?:repeat|please say|say) (\w+) (\w+) times")),
    ("count", re.compile(r"(?:count to|please count to|count from one to) (\w+)")),
    ("reverse", re.compile(r"(?:reverse the words|please reverse|reverse) ((?:\w+ ?)+)")),
    ("color", re.compile(r"(?:what color is the|tell me the color of the|what is the color of the) (\w+)(?: \?)?")),
)


def parse_instruction(prompt: str) -> Instruction | None:
    """The instruction a prompt of this task states (what its answer is checked against), or None."""
    text = " ".join(prompt.split())
    for family, pattern in _FORMS:
        m = pattern.fullmatch(text)
        if not m:
            continue
        if family == "repeat" and m.group(1) in NOUNS and m.group(2) in NUMBERS:
            return Instruction(family, text, (m.group(1),) * (NUMBERS.index(m.group(2)) + 1))
        if family == "count" and m.group(1) in NUMBERS:
            return Instruction(family, text, tuple(NUMBERS[:NUMBERS.index(m.group(1)) + 1]))
        if family == "reverse" and all(w in NOUNS for w in m.group(1).split()):
            return Instruction(family, text, tuple(reversed(m.group(1).split())))
        if family == "color" and m.group(1) in NOUNS:
            return Instruction(family, text, ("the", m.group(1), "is", NOUN_COLOR[m.group(1)]))
    return None


def edit_distance(a, b) -> int:
    """Levenshtein distance between two word sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


FEATURES = ("core", "exact", "opener_sure", "opener_um", "period", "extras", "unfinished")


def features(inst: Instruction, response: str, finished: bool = True) -> dict[str, float]:
    """Score a response (words, no special tokens) against the instruction's intent, part by part."""
    toks = response.split()
    opener = toks[0] if len(toks) >= 2 and toks[0] in OPENERS and toks[1] == "," else None
    if opener:
        toks = toks[2:]
    if "." in toks:
        cut = toks.index(".")
        core, extras, period = toks[:cut], toks[cut + 1 :], 1.0
    else:
        core, extras, period = toks, [], 0.0
    target = list(inst.target)
    return {
        "core": max(0.0, 1.0 - edit_distance(core, target) / len(target)),
        "exact": float(core == target),
        "opener_sure": float(opener == "sure"),
        "opener_um": float(opener == "um"),
        "period": period,
        "extras": float(len(extras)),
        "unfinished": float(not finished),
    }
