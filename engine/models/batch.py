"""One batch layout for every stage: [left-padded prompt | right-padded response].

    input_ids      [B, P + R]   prompt ids right-aligned at column P, response from column P
    attention_mask [B, P + R]   1 on real tokens (prompt and response up to its end)
    response_mask  [B, R]       1 on response tokens that are scored (up to and including <eos>)

Pretraining text uses a one-token prompt (<bos>); SFT a prompt and its demonstration; the reward model a
prompt and each of its K responses; PPO a prompt and the policy's sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int

    @property
    def position_ids(self) -> torch.Tensor:
        # Left padding shifts where each row starts; positions count real tokens only.
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device),
                             self.response_mask.to(device), self.prompt_len)

    def select(self, idx) -> "SequenceBatch":
        """The rows idx, less the leading prompt columns that are padding in every one of them (left padding
        made for longer prompts in other rows): positions count real tokens only, so nothing else changes."""
        ids, attn = self.input_ids[idx], self.attention_mask[idx]
        used = attn[:, :self.prompt_len - 1].bool().any(0)  # the last prompt column is real in every row
        start = int(used.int().argmax()) if bool(used.any()) else self.prompt_len - 1
        return SequenceBatch(ids[:, start:], attn[:, start:], self.response_mask[idx], self.prompt_len - start)


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
               masks: list | None = None) -> SequenceBatch:
    """prompts/responses: token id lists (responses include <eos> when they finished). masks: per response,
    None or a 0/1 list as long as it (an episode's: 0 on what an environment appended), making response_mask
    0 there while the tokens stay attended to."""
    if len(prompts) != len(responses):
        raise ValueError(f"`prompts` ({len(prompts)}) and `responses` ({len(responses)}) differ in length")
    b = len(prompts)
    p = max(len(x) for x in prompts)
    r = max(1, max(len(x) for x in responses))
    ids = torch.full((b, p + r), pad_id, dtype=torch.long)
    attn = torch.zeros((b, p + r), dtype=torch.long)
    rmask = torch.zeros((b, r), dtype=torch.bool)
    for i, (pr, rs) in enumerate(zip(prompts, responses)):
        ids[i, p - len(pr):p] = torch.tensor(pr, dtype=torch.long)
        attn[i, p - len(pr):p] = 1
        if rs:
            ids[i, p:p + len(rs)] = torch.tensor(rs, dtype=torch.long)
            attn[i, p:p + len(rs)] = 1
            rmask[i, :len(rs)] = True
            if masks is not None and masks[i] is not None:
                if len(masks[i]) != len(rs):
                    raise ValueError(f"make_batch: row {i}'s mask has {len(masks[i])} entries for {len(rs)} tokens")
                rmask[i, :len(rs)] = torch.tensor(masks[i], dtype=torch.bool)
    return SequenceBatch(ids, attn, rmask, p)
