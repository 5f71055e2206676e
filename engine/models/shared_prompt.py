"""The hidden states before each response token, with every distinct prompt run once.

GRPO-family batches hold each prompt n times (n answers per prompt), and a trainer's scoring, reference and
update passes would run the same prompt tokens through the body n times, forward and backward. Here the
distinct prompts (all but their last token) run once with transformers' own KV cache, the cache is expanded
to the batch's rows (`batch_select_indices`, an index the backward sums back over), and each row runs only its
last prompt token and its answer against it. The answer's states, and so every log-prob, value and gradient,
are those of the plain pass up to float rounding (tested in float64 for every supported family).

The plain pass runs instead where nothing repeats, where the model cannot keep a cache in training (gradient
checkpointing), with attention other than SDPA or eager (flash-attn on GPUs: untested), and under several
processes (FSDP2 gathers each block once per forward; two calls of the body in one forward are not what its
hooks are tested for here). DPO's batches (the responses of one comparison) and PPO's with several samples
per prompt share; SFT's, one row per prompt, take the plain pass.
"""
from __future__ import annotations

import torch

from ..parallel import distributed
from .batch import SequenceBatch
from .lora import unwrap


def body_of(model):
    """The transformers body inside a causal LM or a scalar-head model (peft's LoRA layers sit inside it)."""
    base = unwrap(model)
    return getattr(base, base.base_model_prefix)


SHARING_ATTENTION = ("sdpa", "sdpa_gqa", "eager")  # tested here; flash-attn's varlen path with a cache is not


def can_share(model) -> bool:
    base = unwrap(model)
    return (distributed.world().size == 1 and not getattr(base, "is_gradient_checkpointing", False)
            and getattr(base.config, "_attn_implementation", None) in SHARING_ATTENTION)


def response_states(model, batch: SequenceBatch, share: bool = True) -> torch.Tensor:
    """The body's last hidden states at the positions before each response token, [B, R, H]."""
    p = batch.prompt_len
    body = body_of(model)
    if share and p > 1 and batch.input_ids.shape[0] > 1 and can_share(model):
        key = torch.cat([batch.input_ids[:, :p - 1], batch.attention_mask[:, :p - 1].long()], 1)
        distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
        if distinct.shape[0] < key.shape[0]:
            return _shared(body, batch, distinct, inverse)
    h = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
             position_ids=batch.position_ids).last_hidden_state
    return h[:, p - 1:-1]


def _shared(body, batch: SequenceBatch, distinct: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    p = batch.prompt_len
    ids, mask = distinct[:, :p - 1], distinct[:, p - 1:]
    cache = body(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 use_cache=True).past_key_values
    cache.batch_select_indices(inverse)  # every row's copy of its prompt's keys and values
    return body(input_ids=batch.input_ids[:, p - 1:-1], attention_mask=batch.attention_mask[:, :-1],
                position_ids=batch.position_ids[:, p - 1:-1], past_key_values=cache,
                use_cache=True).last_hidden_state
