"""LoRA through peft for the policy and value model, and the two views of an adapted model the trainer needs:
the merged weights under the base model's names (pushed into vLLM, which knows nothing of adapters), and a
plain transformers model for the final save and `export`.

The reference model under LoRA is the policy with its adapters disabled (`policy.disable_adapter()`), so the
base weights live in memory once.
"""
from __future__ import annotations

from typing import Iterator

import torch


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def unwrap(model):
    """The transformers model under a peft wrapper (its LoRA layers stay in place and active)."""
    return model.get_base_model() if is_peft(model) else model


def add_lora(model, cfg, *, scalar: bool):
    """Wrap `model` with fresh LoRA adapters. cfg: engine.config.TrainedModelConfig (lora_rank > 0).

    scalar=True (reward/value models): peft's sequence-classification task also trains the scalar head.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else \
        [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, task_type=TaskType.SEQ_CLS if scalar else TaskType.CAUSAL_LM)
    return get_peft_model(model, config)


def load_adapters(model, adapter_dir):
    """Resume: put the adapters saved in `adapter_dir` (peft `save_pretrained`) on `model`, trainable."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


@torch.no_grad()
def merged_named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight as the plain model would have it: W + scale * B @ A for LoRA layers,
    named as in the base checkpoint. A plain model's named_parameters() are passed through."""
    if not is_peft(model):
        yield from ((n, p.detach()) for n, p in model.named_parameters())
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            owner, leaf = name.split(".base_layer.")
            t = p.detach()
            if leaf == "weight":
                layer = layers[owner]
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        t = t + layer.get_delta_weight(adapter).to(t.dtype)
            yield f"{owner}.{leaf}", t
        elif ".modules_to_save." in name or ".original_module." in name:
            # A fully trained module (a value head): the trained copy replaces the original.
            if ".modules_to_save." in name:
                owner, rest = name.split(".modules_to_save.")
                yield f"{owner}.{rest.split('.', 1)[1]}", p.detach()
        else:
            yield name, p.detach()


def plain(model):
    """A transformers model with the adapters merged in (modifies `model`: call it when training is over)."""
    return model.merge_and_unload() if is_peft(model) else model
