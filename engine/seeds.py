"""Every seed of a run, derived from what it is for: a hash of (run seed, stage, step, purpose, ...), never a
sum. Sums collide: with seed + step and slots adding k, prompt slot k at step t + 1 sampled with the seed of
slot k + 1 at step t, so consecutive iterations reused each other's sampling noise. A 63-bit BLAKE2b digest
makes a repeat within a run as likely as a hash collision (about n^2 / 2^64 for n draws)."""
from __future__ import annotations

import hashlib

MASK = 2**63 - 1  # torch generators, numpy and vLLM all take a non-negative int64


def derive_seed(*parts: int | str) -> int:
    """A seed in [0, 2^63) that is a function of `parts` (ints and strings; 1 and "1" differ) and nothing else."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & MASK


def step_seeds(seed: int, stage: str, step: int) -> tuple[int, int]:
    """(torch's global RNG, the step's data generator) for one step of a stage."""
    return derive_seed(seed, stage, step, "torch"), derive_seed(seed, stage, step, "data")


def rollout_seeds(seed: int, stage: str, step: int, round_: int, n_prompts: int) -> list[int]:
    """One seed per prompt slot of a generation call: step `step`, sampling round `round_` (dynamic sampling
    refills in rounds). A backend derives each sample's stream from its prompt's seed (`sample_seed` for
    transformers; vLLM adds the sample's index to its request's seed)."""
    return [derive_seed(seed, stage, step, "generate", round_, k) for k in range(n_prompts)]


def sample_seed(prompt_seed: int, sample: int) -> int:
    """The seed of sample `sample` of a prompt seeded with `prompt_seed`."""
    return derive_seed(prompt_seed, "sample", sample)
