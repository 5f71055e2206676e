"""A transformer block's activation memory at a number of tokens, traced, not guessed: one block of the
model's own class is built and run forward and backward under FakeTensorMode (no memory, no compute) with
torch's MemTracker, which attributes every tensor alive to parameters, gradients, activations or
temporaries. Decoder models with `model.layers` and a rotary embedding (Llama, Qwen2, Mistral) are traced;
others are refused by name."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockActivations:
    """Bytes for one block at `tokens` tokens: saved (kept from its forward for its backward) and peak (the
    most alive at once while it runs forward then backward, its parameters and gradients excluded)."""
    tokens: int
    saved: int
    peak: int
    hidden_bytes: int   # one [tokens, hidden] tensor: what a checkpointed block keeps


def _kinds(snapshot) -> dict[str, int]:
    out: dict[str, int] = {}
    for per_device in snapshot.values():
        for kind, n in per_device.items():
            out[str(kind).split(".")[-1]] = out.get(str(kind).split(".")[-1], 0) + int(n)
    return out


def trace_block(config, tokens: int, dtype: torch.dtype) -> BlockActivations:
    """One block of `config`'s model, [1, tokens] through it and back, in `dtype`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from .world import build

    skeleton = build(config, scalar=False)
    body = getattr(skeleton, skeleton.base_model_prefix)
    layers, rope = getattr(body, "layers", None), getattr(body, "rotary_emb", None)
    if layers is None or rope is None:
        raise ValueError(f"plan: a {config.model_type} model has no `model.layers` with a rotary embedding; the "
                         f"planner traces Llama-family decoders (llama, qwen2, mistral)")
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)
        try:
            block = type(layers[0])(config, 0)
            rotary = type(rope)(config)
            x = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
            pos = torch.arange(tokens)[None]
            tracker = MemTracker()
            tracker.track_external(block)
            with tracker:
                out = block(x, position_embeddings=rotary(x, pos), attention_mask=None, position_ids=pos)
                out = out[0] if isinstance(out, tuple) else out
                saved = _kinds(tracker.get_tracker_snapshot()).get("ACT", 0)
                out.float().sum().backward()
            peak = _kinds(tracker.get_tracker_snapshot("peak"))
        finally:
            torch.set_default_dtype(default)
    hidden = tokens * config.hidden_size * torch.finfo(dtype).bits // 8
    # at the tracker's peak (backward: saved tensors partly freed, gradients allocated) or at the end of forward
    return BlockActivations(tokens, saved, max(saved, peak.get("ACT", 0) + peak.get("TEMP", 0)), hidden)
