"""The engine's own sharding, applied in a simulated world: models built on the meta device, `models.sharding.shard`
run with torch's "fake" process group of any size (`parallel.distributed.simulated_world`: no peers, no
memory), and each rank's share read off the resulting DTensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.sharding import shard
from ..parallel import distributed as dist


@dataclass(frozen=True)
class Shards:
    """One model as FSDP2 lays it out over the world, counted in elements. params: the whole model; local:
    the largest rank's share (rank 0: FSDP2 gives it ceil(rows / W) of every weight); units: each FSDP
    unit's whole size (the transformer blocks, then the root's embeddings, norm and heads), what one
    all-gather materialises; largest: the largest single weight (what one gather of a whole tensor holds)."""
    params: int
    local: int
    units: tuple[int, ...]
    layers: int
    largest: int = 0

    @property
    def largest_unit(self) -> int:
        return max(self.units)


def build(config, scalar: bool) -> torch.nn.Module:
    """The transformers model of `config` on the meta device (a causal LM, or the same body with a scalar
    head), weights tied as from_pretrained ties them."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..models.forward import quiet_transformers

    quiet_transformers()
    cls = AutoModelForSequenceClassification if scalar else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    model.tie_weights()
    return model


def shards(config, scalar: bool, world: int) -> Shards:
    """Build, wrap and shard one model as the engine does, in a fake world of `world` ranks."""
    from ..models.forward import PolicyLogprobs, SequenceScores

    model = build(config, scalar)
    wrapper = SequenceScores(model) if scalar else PolicyLogprobs(model)
    blocks = dist.blocks(wrapper)
    whole = sum(p.numel() for p in model.parameters())
    units = [sum(p.numel() for p in b.parameters()) for b in blocks]
    with dist.simulated_world(world):
        shard(wrapper)
        local = sum(dist.local(p).numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    return Shards(whole, local, (*units, whole - sum(units)), len(blocks), largest)
