"""Loading users' local transformers checkpoints: tokenizer, policy, reward and value models.

Nothing is fetched from a hub: every path must be a local directory written by `save_pretrained`. Weights
load in bfloat16 on a GPU and float32 on the CPU (`run.dtype`), with SDPA attention, or FlashAttention 2 on
a GPU where `flash-attn` is installed (`run.attention`). Every mismatch that would silently corrupt training
is an error naming the flag and the fix: a tokenizer with more tokens than the model's embedding, a
value model whose tokenizer differs from the policy's.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from .lora import add_lora, load_adapters

log = logging.getLogger("engine")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_attention(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    has_flash = importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"


def compute_precision(run):
    """The context every pass of a run on the user's checkpoints computes under: autocast to run.dtype when
    that is a 16-bit type (frozen models are stored in it; trained ones keep float32 weights), else nothing."""
    import contextlib

    device = torch.device(run.device)
    dtype = resolve_dtype(run.dtype, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def checkpoint_dir(path, flag: str) -> Path:
    """`path` as a directory holding a transformers checkpoint, or a FileNotFoundError naming `flag`."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no such directory (a local transformers checkpoint written "
                                f"by save_pretrained; nothing is downloaded)")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: no config.json in this directory; expected a transformers "
                                f"checkpoint written by save_pretrained")
    return p


def load_tokenizer(path, flag: str = "--policy.path"):
    """The tokenizer saved beside the model. A missing pad token becomes the eos token (GPT-2 has none)."""
    from transformers import AutoTokenizer

    p = checkpoint_dir(path, flag)
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"{flag} {path}: no usable tokenizer in this directory ({exc}); save the "
                                f"model's tokenizer there with tokenizer.save_pretrained") from None
    if tok.eos_token_id is None:
        raise ValueError(f"{flag} {path}: the tokenizer has no eos token, so generations could never end; "
                         f"set tokenizer.eos_token and save it again")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def same_vocabulary(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def check_vocab(tokenizer, model, flag: str, path) -> None:
    """A tokenizer may have fewer tokens than the embedding (padded vocabularies), never more."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"{flag} {path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} "
            f"rows, so token ids >= {rows} would index past it. Use the tokenizer saved with this model, or "
            f"call model.resize_token_embeddings(len(tokenizer)) and save the model again.")


def load_model(path, *, flag: str, scalar: bool, device, run, train=None, resume=None, tokenizer=None):
    """A causal LM (scalar=False) or the same body with a one-output scalar head (scalar=True).

    run: RunConfig (dtype, attention). train: TrainedModelConfig of a trained role (gradient checkpointing,
    LoRA) or None for a frozen one. resume: a checkpoint's model directory: full weights replace `path`;
    saved LoRA adapters go on top of `path`. tokenizer: checked against the model's embedding size.
    """
    adapters = None
    if resume is not None:
        if (Path(resume) / "adapter_config.json").is_file():
            adapters = resume
        else:
            path = resume
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .models import quiet_transformers

    quiet_transformers()
    p = checkpoint_dir(path, flag)
    device = torch.device(device)
    dtype = resolve_dtype(run.dtype, device)
    if train is not None and train.lora_rank == 0:
        # Trained weights stay float32 (the master copy): a bf16 weight would swallow updates smaller than
        # 1/256 of itself, i.e. most of PPO's. The passes still compute in `dtype` (see `compute_precision`).
        dtype = torch.float32
    kw = dict(dtype=dtype, attn_implementation=resolve_attention(run.attention, device))
    if scalar:
        model = AutoModelForSequenceClassification.from_pretrained(str(p), num_labels=1, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), **kw)
    if tokenizer is not None:
        check_vocab(tokenizer, model, flag, path)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if train is not None and train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapters is not None:
        model = load_adapters(model, adapters)
    elif train is not None and train.lora_rank > 0:
        model = add_lora(model, train, scalar=scalar)
    if train is None:
        model.requires_grad_(False).eval()
    return model.to(device)
