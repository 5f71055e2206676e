"""The engine's own sharding, applied in a simulated world: models built on the meta device, `models.sharding.shard`
run with torch's "fake" process group of any size (`parallel.distributed.simulated_world`: no peers, no
memory), and each rank's share read off the resulting DTensors."""
from __future__ import annotations

import math
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


SIMULATED = 64  # worlds up to this size are sharded for real (fake process group); larger ones counted


def shards(config, scalar: bool, world: int) -> Shards:
    """Build, wrap and shard one model as the engine does, in a fake world of `world` ranks. FSDP2 builds
    every rank's chunk of every weight while it shards (time and memory grow with the world), so past
    SIMULATED ranks rank 0's share is counted instead (`rank0_share`: the same dim-0 chunking, which the tests
    check against the simulation)."""
    from ..models.forward import PolicyLogprobs, SequenceScores

    model = build(config, scalar)
    wrapper = SequenceScores(model) if scalar else PolicyLogprobs(model)
    blocks = dist.blocks(wrapper)
    whole = sum(p.numel() for p in model.parameters())
    units = [sum(p.numel() for p in b.parameters()) for b in blocks]
    if world > SIMULATED:
        local = sum(rank0_share(p.shape, world) for p in model.parameters())
    else:
        with dist.simulated_world(world):
            shard(wrapper)
            local = sum(dist.local(p).numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    return Shards(whole, local, (*units, whole - sum(units)), len(blocks), largest)


def rank0_share(shape: torch.Size, world: int) -> int:
    """Elements of a weight of `shape` on rank 0 under FSDP2's dim-0 sharding: the first of torch.chunk's
    chunks of ceil(rows / world) rows (all of them when world >= rows: one row)."""
    if len(shape) == 0:
        return 1
    rows = shape[0]
    per_row = math.prod(shape[1:])
    return min(-(-rows // world), rows) * per_row
