"""A model wrapper sharded over the processes, its weights in place: FSDP2 (`parallel.distributed.apply_fsdp`),
then the slices of every model that `loading.load_model` built on the meta device read from its checkpoint
(`meta_load.materialize`). What the trainers and stages call on every model they train or score."""
from __future__ import annotations

import torch

from ..parallel import distributed as dist
from .lora import is_peft
from .meta_load import materialize


def shard(module: torch.nn.Module, *, offload: bool = False) -> torch.nn.Module:
    """`module` (a forward module of engine.models.forward) sharded with FSDP2 and its meta-built models
    allocated and read, this rank's rows only; the identity in a world of one. Build optimizers after this:
    the parameters become DTensors holding this rank's rows.
    offload: a frozen model's shards kept in CPU memory (FSDP2's CPUOffloadPolicy; --run.offload_frozen)."""
    w = dist.world()
    if w.size == 1:
        return dist.apply_fsdp(module, offload=offload)
    if any(is_peft(m) for m in module.modules()):
        raise ValueError("LoRA (--policy.lora_rank / --value.lora_rank) is not supported with more than one "
                         "process yet; train the full model, or run LoRA in one process")
    dist.apply_fsdp(module, offload=offload)
    # models built on the meta device get their slices (offloaded: in CPU memory)
    materialize(module, torch.device("cpu") if offload else dist.device_of(w.mesh.device_type))
    return module
