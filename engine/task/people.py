"""Simulated people: a demonstrator who makes human-like mistakes, and labelers who share a hidden
preference but disagree with one another about as often as InstructGPT's labelers did (~73% agreement).

The hidden preference is a weighted sum of `instructions.features`: above all a correct answer, then a
polite opener ("sure ,"), a closing period, no rambling after it, and finishing at all. Each labeler has
their own weights (the shared ones, each scaled by a personal factor) and judges with noise.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .instructions import EXTRA_WORDS, FEATURES, OPENERS, Instruction, features
from .vocab import COLORS, NOUNS, NUMBERS

SHARED_WEIGHTS = {"core": 2.0, "exact": 1.0, "opener_sure": 0.6, "opener_um": -0.6, "period": 0.5,
                  "extras": -0.4, "unfinished": -1.5}


def _corrupt_core(inst: Instruction, rng: random.Random) -> list[str]:
    """One human-like mistake in the core answer: miscounting, an order slip, a wrong fact."""
    core = list(inst.target)
    if inst.family in ("repeat", "count"):
        if rng.random() < 0.5 and len(core) > 1:
            return core[:-1]
        extra = core[-1] if inst.family == "repeat" else NUMBERS[min(len(core), len(NUMBERS) - 1)]
        return core + [extra]
    if inst.family == "reverse":
        if rng.random() < 0.5:
            return core[::-1]  # forgot to reverse
        i = rng.randrange(len(core) - 1)
        core[i], core[i + 1] = core[i + 1], core[i]
        return core
    core[3] = rng.choice([c for c in COLORS if c != core[3]])
    return core


def _stop_early(inst: Instruction, rng: random.Random) -> list[str]:
    """A model's mistake rather than a person's: the answer stops (or runs on) well short of (past) the target."""
    core = list(inst.target)
    if len(core) > 1 and rng.random() < 0.7:
        return core[: rng.randint(1, len(core) - 1)]
    return core + [core[-1]] * rng.randint(1, 3)


def write_response(inst: Instruction, rng: random.Random, skill: float = 1.0, core: list[str] | None = None) -> str:
    """A demonstration. skill scales the chance of each mistake (1.0 = the demonstrators' own rate);
    `core` replaces the answer's core (used for model samples that went wrong)."""
    def slip(p):
        return rng.random() < min(1.0, p * skill)

    parts: list[str] = []
    r = rng.random()
    if r < 0.30:
        parts += ["sure", ","]
    elif r < 0.55:
        parts += ["ok", ","]
    elif r < 0.55 + 0.20 * skill:
        parts += ["um", ","]
    if core is not None:
        parts += core
    else:
        parts += _corrupt_core(inst, rng) if slip(0.3) else list(inst.target)
    if not slip(0.5):
        parts.append(".")
    if slip(0.2):
        parts += rng.sample(EXTRA_WORDS, rng.randint(1, 2))
    return " ".join(parts)


def candidate_response(inst: Instruction, rng: random.Random) -> tuple[str, bool]:
    """One of the K samples a labeler ranks: from 'models' of mixed quality, sometimes broken output.

    Returns (response words, finished), finished False when the sample ran out of tokens.
    """
    r = rng.random()
    if r < 0.08:  # degenerate sample: random words, maybe never finished
        n = rng.randint(1, 10)
        pool = NOUNS + NUMBERS + list(OPENERS) + ["the", "is", ",", "."]
        return " ".join(rng.choice(pool) for _ in range(n)), rng.random() < 0.5
    skill = rng.choice([0.3, 0.6, 1.0, 1.5, 2.0])
    if r < 0.20:  # a sample from a model that lost count: stops early or runs on
        return write_response(inst, rng, skill, core=_stop_early(inst, rng)), True
    return write_response(inst, rng, skill), True


@dataclass(frozen=True)
class Labeler:
    id: int
    weights: dict
    noise: float

    def utility(self, inst: Instruction, response: str, finished: bool, rng: random.Random) -> float:
        f = features(inst, response, finished)
        return sum(self.weights[k] * f[k] for k in FEATURES) + self.noise * rng.gauss(0.0, 1.0)

    def rank(self, inst: Instruction, responses, finished, rng: random.Random) -> list[int]:
        """Rank of each response, 0 = best (a permutation of range(K))."""
        u = [self.utility(inst, r, f, rng) for r, f in zip(responses, finished)]
        order = sorted(range(len(u)), key=lambda i: -u[i])
        ranks = [0] * len(u)
        for pos, i in enumerate(order):
            ranks[i] = pos
        return ranks

    def compare(self, inst: Instruction, a: str, b: str, rng: random.Random, finished_a=True,
                finished_b=True) -> float:
        """1.0 if the labeler prefers a, 0.0 if b, 0.5 for identical responses (a tie)."""
        if a == b and finished_a == finished_b:
            return 0.5
        return float(self.utility(inst, a, finished_a, rng) > self.utility(inst, b, finished_b, rng))


def make_labelers(n: int, first_id: int, noise: float, spread: float, seed: int) -> list[Labeler]:
    """n labelers with personal weights = shared weights * exp(spread * N(0, 1)) per feature."""
    out = []
    for i in range(first_id, first_id + n):
        rng = random.Random(f"labeler-{seed}-{i}")
        w = {k: v * math.exp(spread * rng.gauss(0.0, 1.0)) for k, v in SHARED_WEIGHTS.items()}
        out.append(Labeler(i, w, noise))
    return out


def pairwise_agreement(ranks_a, ranks_b) -> tuple[int, int]:
    """(pairs ordered the same way by two rankings of the same K responses, pairs compared)."""
    k = len(ranks_a)
    same = total = 0
    for i in range(k):
        for j in range(i + 1, k):
            total += 1
            same += (ranks_a[i] < ranks_a[j]) == (ranks_b[i] < ranks_b[j])
    return same, total
