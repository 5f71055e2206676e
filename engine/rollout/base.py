"""The rollout protocol every generation backend implements (a contract: keep these names)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch


@dataclass
class RolloutResult:
    prompt_index: int                # which prompt of the call (results are prompt-major: n per prompt)
    token_ids: list[int]             # sampled tokens, including the stop token if one was produced
    logprobs: list[float] = field(default_factory=list)  # the engine's log-prob of each sampled token
    finish_reason: str = "length"    # "stop" (stop/eos token) or "length" (ran out of max_tokens)
    # An episode of several turns (engine.episodes): token_ids holds every turn and what the environment
    # appended between them; loss_mask is 1 on the model's own tokens, 0 on the appended ones (None: all 1).
    loss_mask: list[int] | None = None
    episode: object | None = None    # engine.episodes.runner.EpisodeStats


class RolloutBackend(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], *, n: int = 1, max_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                 stop_token_ids: list[int] | None = None, seed: int | None = None,
                 seeds: list[int] | None = None) -> list[RolloutResult]:
        """n answers per prompt, prompt-major. seed: prompt i samples with seed + i; seeds: one seed per
        prompt instead. A prompt's answers depend only on its seed, not on the other prompts of the call."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


def prompt_seeds(n_prompts: int, seed: int | None, seeds: list[int] | None) -> list[int] | None:
    """The per-prompt seeds of a generate call (None: unseeded)."""
    if seeds is not None:
        if len(seeds) != n_prompts:
            raise ValueError(f"`seeds` has {len(seeds)} entries for {n_prompts} prompts; give one per prompt")
        return [int(s) for s in seeds]
    return None if seed is None else [seed + i for i in range(n_prompts)]
