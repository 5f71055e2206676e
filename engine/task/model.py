"""The tiny policy the built-in task pretrains: a real LlamaForCausalLM (vLLM's CPU backend needs head_dim 64)."""
from __future__ import annotations


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
