"""Models: the tiny Llama built from config, loading saved ones, and the forward passes every stage uses.

The policy is a `LlamaForCausalLM` (any transformers causal LM works the same way); the reward and value
models are `AutoModelForSequenceClassification` with one label: the same body with a scalar head, as TRL
and OpenRLHF build them. The RM's normalising offset (so demonstrations score 0 on average) is stored in its
config as `score_offset`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

import kernels

from .batch import SequenceBatch
from .lora import unwrap


def quiet_transformers() -> None:
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()  # "Loading weights" bars on every tiny load drown the run's own progress
    logging.getLogger("transformers").setLevel(logging.ERROR)


def build_policy(cfg, tokenizer):
    """A randomly initialised LlamaForCausalLM sized by `cfg` (engine.config.ModelConfig)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def load_policy(path: str | Path, device="cpu"):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True).to(device)


def load_scalar_model(path: str | Path, device="cpu"):
    """A reward/value model; from a causal-LM directory the body loads and a fresh scalar head is added."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32,
                                                               use_safetensors=True)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    return model.to(device)


def _body(model):
    model = unwrap(model)  # peft: the LoRA layers sit inside the base model, so its body runs them
    return getattr(model, model.base_model_prefix)


def body_hidden(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """The last hidden states of the model's body (no LM or score head), [B, T, H]."""
    out = _body(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return out.last_hidden_state


def _hidden(model, batch: SequenceBatch) -> torch.Tensor:
    return body_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)


def response_logprobs(policy, batch: SequenceBatch, *, temperature: float = 1.0, return_entropy=False,
                      backend: str = "auto", fused: bool = True):
    """Log-prob of each response token, [B, R] float32 (and entropies), 0 where response_mask is 0.

    fused=True: the body's hidden states at the scored positions go through
    `kernels.linear_token_logprobs` with the LM head's weight, so no [tokens x vocab] logits exist.
    fused=False (for comparison): the LM head runs on every response position, then
    `kernels.token_logprobs` (still without a float32 copy of the logits).
    """
    p = batch.prompt_len
    h = _hidden(policy, batch)[:, p - 1:-1]            # state before each response token, [B, R, H]
    head = unwrap(policy).get_output_embeddings()
    if not fused or not isinstance(head, torch.nn.Linear):
        logits = head(h)                                 # [B, R, V]
        return kernels.token_logprobs(logits, batch.response_ids, temperature=temperature,
                                      return_entropy=return_entropy, backend=backend)
    mask = batch.response_mask
    weight, bias = head.weight, head.bias
    if weight.dtype != h.dtype:  # float32 master weights under bf16 autocast: the GEMMs run in h's dtype
        weight, bias = weight.to(h.dtype), (None if bias is None else bias.to(h.dtype))
    out = kernels.linear_token_logprobs(h[mask], weight, batch.response_ids[mask], bias=bias,
                                        temperature=temperature, return_entropy=return_entropy, backend=backend)
    outs = out if return_entropy else (out,)
    full = []
    for x in outs:  # scatter the scored tokens back into [B, R]
        y = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        full.append(y.masked_scatter(mask, x))
    return tuple(full) if return_entropy else full[0]


def token_values(value_model, batch: SequenceBatch) -> torch.Tensor:
    """Value estimate at each response token's decision point, [B, R]."""
    p = batch.prompt_len
    h = _hidden(value_model, batch)[:, p - 1:-1]
    return unwrap(value_model).score(h).squeeze(-1).float()


def sequence_scores(reward_model, batch: SequenceBatch) -> torch.Tensor:
    """Reward-model score of each whole sequence, read at its last real token, [B], minus `score_offset`."""
    h = _hidden(reward_model, batch)
    idx, _ = kernels.reference.last_valid_index(batch.attention_mask)
    last = h[torch.arange(h.shape[0]), idx]
    offset = float(getattr(reward_model.config, "score_offset", 0.0))
    return unwrap(reward_model).score(last).squeeze(-1).float() - offset
