"""The models as the trainers call them: small modules around a transformers model, each called through its
own forward (so that hooks on a wrapping root module run, as FSDP2's do), each returning what RLHF needs and
never the [tokens x vocab] logits:

    PolicyLogprobs(lm)(batch)      log-prob of each response token [B, R] (and its entropy)
    TokenValues(scalar)(batch)     the value model's estimate at each response token [B, R]
    SequenceScores(scalar)(batch)  the reward model's score of each whole sequence [B], minus `score_offset`

`lm` is any transformers causal LM, `scalar` the same body with a one-output `score` head
(`AutoModelForSequenceClassification`, num_labels=1), as TRL and OpenRLHF build reward and value models;
either may be wrapped by peft (LoRA), whose adapted layers run inside the body. The RM's normalising offset
(demonstrations score 0 on average) lives in its config as `score_offset`.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

import kernels

from .batch import SequenceBatch
from .lora import unwrap
from .shared_prompt import body_of, response_states


class Inside:
    """Passed to a model wrapper in place of a batch: the wrapper calls fn(its transformers model) inside its
    own forward and returns the result. Under FSDP2 the root's forward is where the root's parameters
    (embeddings, final norm, heads) are gathered, so generation and checks on the inner model run through
    here (`run_inside`); in one process it is a plain call."""

    def __init__(self, fn):
        self.fn = fn


def run_inside(wrapper: nn.Module, fn):
    """fn(the model inside `wrapper`), run within the wrapper's forward."""
    return wrapper(Inside(fn))


def quiet_transformers() -> None:
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()  # "Loading weights" bars on every tiny load drown the run's own progress
    logging.getLogger("transformers").setLevel(logging.ERROR)


def body_hidden(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """The body's last hidden states [B, T, H] (no LM or score head; peft's LoRA layers sit inside the body,
    so they run)."""
    body = body_of(model)
    return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state


def _hidden(model, batch: SequenceBatch) -> torch.Tensor:
    return body_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)


class PolicyLogprobs(nn.Module):
    """A causal LM as the trainer calls it: forward(batch) -> log-prob of each response token, [B, R] float32,
    0 where batch.response_mask is 0 (with return_entropy, also the entropies).

    fused=True: the hidden states at the scored positions go through `kernels.linear_token_logprobs` with the
    LM head's weight, so no logits exist. fused=False (kept for comparison): the LM head on every response
    position, then `kernels.token_logprobs` (still no float32 copy of the logits). `backend` picks the kernels'.
    share_prompts: each distinct prompt runs once per call (`shared_prompt`), the same states up to rounding.
    """

    def __init__(self, lm, *, backend: str = "auto", fused: bool = True, share_prompts: bool = True):
        super().__init__()
        self.lm, self.backend, self.fused, self.share_prompts = lm, backend, fused, share_prompts

    def forward(self, batch: SequenceBatch, temperature: float = 1.0, return_entropy: bool = False):
        if isinstance(batch, Inside):
            return batch.fn(self.lm)
        h = response_states(self.lm, batch, self.share_prompts)  # the state before each response token, [B, R, H]
        head = unwrap(self.lm).get_output_embeddings()
        if not self.fused or not isinstance(head, nn.Linear):
            return kernels.token_logprobs(head(h), batch.response_ids, temperature=temperature,
                                          return_entropy=return_entropy, backend=self.backend)
        mask = batch.response_mask
        weight, bias = head.weight, head.bias
        if weight.dtype != h.dtype:  # float32 master weights under bf16 autocast: the GEMMs run in h's dtype
            weight, bias = weight.to(h.dtype), (None if bias is None else bias.to(h.dtype))
        out = kernels.linear_token_logprobs(h[mask], weight, batch.response_ids[mask], bias=bias,
                                            temperature=temperature, return_entropy=return_entropy,
                                            backend=self.backend)
        full = [torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x)  # back to [B, R]
                for x in (out if return_entropy else (out,))]
        return tuple(full) if return_entropy else full[0]


class TokenValues(nn.Module):
    """A value model: forward(batch) -> its estimate at each response token's decision point, [B, R] float32."""

    def __init__(self, scalar, *, share_prompts: bool = True):
        super().__init__()
        self.scalar, self.share_prompts = scalar, share_prompts

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        if isinstance(batch, Inside):
            return batch.fn(self.scalar)
        h = response_states(self.scalar, batch, self.share_prompts)
        return unwrap(self.scalar).score(h).squeeze(-1).float()


class SequenceScores(nn.Module):
    """A reward model: forward(batch) -> the score of each whole sequence, read at its last real token, minus
    the config's `score_offset`, [B] float32.

    An ensemble of M members as M score heads on one body (config num_labels M, score_offset a list of M):
    forward(batch, members=True) -> every member's scores [M, B]; forward(batch) -> `combine` of them [B]
    (engine.overopt.ensemble: mean, WCO or UWO; the mean when None). One head is itself either way."""

    def __init__(self, scalar, combine=None):
        super().__init__()
        self.scalar, self.combine = scalar, combine

    def forward(self, batch: SequenceBatch, members: bool = False) -> torch.Tensor:
        if isinstance(batch, Inside):
            return batch.fn(self.scalar)
        h = _hidden(self.scalar, batch)
        idx, _ = kernels.reference.last_valid_index(batch.attention_mask)
        last = h[torch.arange(h.shape[0], device=h.device), idx]
        scores = unwrap(self.scalar).score(last).float().T  # [M, B]
        scores = scores - torch.as_tensor(score_offsets(self.scalar, scores.shape[0]), dtype=scores.dtype,
                                          device=scores.device)[:, None]
        if members:
            return scores
        if scores.shape[0] == 1:
            return scores[0]
        return self.combine(scores) if self.combine is not None else scores.mean(0)

    @property
    def heads(self) -> int:
        """M, the members of the ensemble (1: a single reward model)."""
        return unwrap(self.scalar).score.out_features


def score_offsets(scalar, heads: int) -> list[float]:
    """The config's score_offset per head: a number (one head; several share it) or a list of one per head."""
    offset = getattr(unwrap(scalar).config, "score_offset", 0.0)
    values = offset if isinstance(offset, (list, tuple)) else [offset] * heads
    if len(values) != heads or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"the reward model's config.json: score_offset must be a number or a list of {heads} "
                         f"numbers (one per score head), got {offset!r}")
    return [float(v) for v in values]
