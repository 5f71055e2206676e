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


class RolloutBackend(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], *, n: int = 1, max_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                 stop_token_ids: list[int] | None = None, seed: int | None = None) -> list[RolloutResult]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...
