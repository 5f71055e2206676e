"""`python -m engine tiny-model`: a small randomly initialised checkpoint of a real model family, written
with `save_pretrained` beside a byte-level BPE tokenizer trained on the spot, so the real-model path
(`--policy.path`) can be tried, tested and benchmarked with no download.

Each family keeps what makes it itself: Llama's grouped-query attention and Llama-3-style chat template,
Qwen2's tied embeddings, attention biases and ChatML template (eos = <|im_end|>, no bos), Mistral's
[INST] template and missing pad token, GPT-2's learned positions, Conv1D layers and no chat template.
Vocabularies are padded to a multiple of 64 (the model has more rows than the tokenizer has tokens).
"""
from __future__ import annotations

import random
from pathlib import Path

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")

_TEMPLATES = {
    "llama": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "qwen2": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }}"
                "{{ eos_token }}{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}"
                "{{ m['content'] }}\n\n{% endif %}{% endfor %}"),
    "gpt2": None,
}
# (bos, eos, pad, extra special tokens)
_SPECIALS = {
    "llama": ("<|begin_of_text|>", "<|eot_id|>", "<|finetune_pad|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "qwen2": (None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>"]),
    "mistral": ("<s>", "</s>", None, []),
    "gpt2": ("<|endoftext|>", "<|endoftext|>", None, []),
}


def _texts(n: int = 3000) -> list[str]:
    from .corpus import make_corpus

    extra = ["Explain photosynthesis in one sentence.", "Name three primary colors.", "Red, yellow and blue.",
             "What is 17 times 3?", "Write a haiku about the sea.", "Sure, here is a short answer."]
    return make_corpus(n, random.Random(0)) + extra * 20


def build_tokenizer(family: str, vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, extra = _SPECIALS[family]
    specials = list(dict.fromkeys(t for t in (bos, eos, pad, *extra) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos and family in ("llama", "mistral"):  # these tokenizers put bos before plain text
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=extra or None, chat_template=_TEMPLATES[family])


def build_config(family: str, tokenizer, hidden: int = 128, layers: int = 2, heads: int = 2, positions: int = 512):
    import transformers

    vocab = -(-len(tokenizer) // 64) * 64
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                       n_positions=positions, **ids)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[family]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=positions,
              tie_word_embeddings=family == "qwen2", **ids)
    if family == "mistral":
        kw["sliding_window"] = None
    return cls(**kw)


def write_tiny_model(family: str, to: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 2,
                     seed: int = 0) -> Path:
    """Write a random `family` causal LM and its tokenizer to `to` (head_dim = hidden / heads; vLLM's CPU
    backend wants 64). Returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {FAMILIES}, got {family!r}")
    tokenizer = build_tokenizer(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(family, tokenizer, hidden, layers, heads))
    to = Path(to)
    model.save_pretrained(to)
    tokenizer.save_pretrained(to)
    return to
