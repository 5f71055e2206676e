"""Past one process: the process group, the device mesh, FSDP2 sharding and the all-reduced statistics, in one
place, on PyTorch's own stack (torch.distributed, `fully_shard`, DCP, torchrun). The trainers read as in one
process with a few calls into this module; a single process is a world of one, where every call below is
the identity (no process group, no sharding), so one code path serves both.

How work is split (results do not depend on the world size):
- every rank holds the whole data set and draws the same global batch (the same seeded generator), then
  works on its share of the rows (`rows`: rank r takes rows r, r + W, r + 2W, ...);
- the denominators of every loss are the global batch's, which each rank computes from the rows it knows, so
  `part(mean, local, total)` turns a local mean into this rank's part of the global mean, and `backward`
  scales it by W, which FSDP's averaging of the gradients divides again;
- what PPO derives from its rollouts (rewards, advantages and their whitening, KL, metrics) is computed from
  rows gathered onto every rank (`map_rows`), so every statistic is the global one;
- logged numbers are summed over ranks (`all_sum`) from those shares.

Launch: `torchrun --nproc_per_node N -m engine <command> ...`; NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from . import peers

log = logging.getLogger("engine")


@dataclass(frozen=True)
class World:
    """This process's place: rank in [0, size), local_rank on its node, and the 1-D mesh FSDP2 shards over
    (None in a world of one)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mesh: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0


_WORLD = World()


def world() -> World:
    return _WORLD


def launched() -> bool:
    """Started by torchrun (or anything that sets its environment) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str, timeout_s: float = 600.0) -> World:
    """Join the job torchrun started (NCCL on cuda, gloo on cpu) and build the mesh; a world of one when not
    launched by torchrun. timeout_s bounds every collective, so a rank that died cannot hang the others."""
    global _WORLD
    if not launched():
        _WORLD = World()
        return _WORLD
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    size = dist.get_world_size()
    mesh = init_device_mesh(device, (size,), mesh_dim_names=("dp",))
    _WORLD = World(dist.get_rank(), size, local_rank, mesh)
    peers.join(_WORLD.rank, dist.all_gather_object)  # who is who, to say which rank ended if one dies
    return _WORLD


def close(clean: bool = False) -> None:
    """Leave the job. clean: every rank got here without an error, so they meet first (a rank that tears its
    group down while a peer still talks to it can abort in gloo's threads), and the sharded models' reference
    cycles are collected now, while the interpreter is whole, not in its finalization, where gloo's last work
    items would release their tensors without a GIL to take (SIGABRT at exit, pytorch/pytorch#179291)."""
    global _WORLD
    if _WORLD.size > 1:
        import gc

        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(AssertionError, RuntimeError, ValueError):  # vLLM may have torn it down
                gc.collect()
                if clean:
                    dist.barrier()
                dist.destroy_process_group()
        if clean:  # after a failure the notes stay: a peer still ending reads them to know who said why
            peers.leave()
    _WORLD = World()


def device_of(run_device: str) -> torch.device:
    """The device this rank computes on: cuda:<local rank> on GPUs."""
    if run_device == "cuda":
        return torch.device("cuda", _WORLD.local_rank)
    return torch.device(run_device)


# ---------------------------------------------------------------------------------------------- sharding

def blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of every transformers model inside `module` (the classes each model lists in
    `_no_split_modules`, as accelerate's FSDP wrapping finds them)."""
    names = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in module.modules() if type(m).__name__ in names]


def apply_fsdp(module: torch.nn.Module, *, offload: bool = False) -> torch.nn.Module:
    """FSDP2 over the mesh: each transformer block, then `module` itself as the root (a forward module of
    engine.models.forward, so that everything it computes runs inside its forward's all-gather). On GPUs the
    parameters are gathered in bfloat16 and gradients reduced in float32. The identity in a world of one.
    Models built on the meta device stay there: `engine.models.sharding.shard` (what the trainers call) reads
    their slices after this.
    offload: a frozen model's shards kept in CPU memory (FSDP2's CPUOffloadPolicy; --run.offload_frozen)."""
    w = _WORLD
    if w.size == 1:
        if offload:
            log.warning("--run.offload_frozen: one process shards nothing, so nothing is offloaded")
        return module
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": w.mesh}
    if w.mesh.device_type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:  # a frozen model's shards live in (pinned) CPU memory, copied to the GPU for each all-gather
        from torch.distributed.fsdp import CPUOffloadPolicy

        kw["offload_policy"] = CPUOffloadPolicy()
    # reshard after every forward, frozen models too: kept gathered, a model that never runs backward would
    # stay whole on every rank from its first forward on
    for block in blocks(module):
        fully_shard(block, reshard_after_forward=True, **kw)
    fully_shard(module, reshard_after_forward=True, **kw)
    return module


@contextlib.contextmanager
def simulated_world(size: int):
    """This process as rank 0 of `size` on torch's "fake" process group for the block (no peers, no memory
    moved): what `engine plan` shards models in to read each rank's share off the DTensors."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh

    global _WORLD
    before = _WORLD
    if size > 1:
        tdist.init_process_group("fake", store=tdist.HashStore(), rank=0, world_size=size)
        _WORLD = World(0, size, 0, init_device_mesh("cpu", (size,)))
    try:
        yield
    finally:
        _WORLD = before
        if size > 1:
            tdist.destroy_process_group()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly) sharded tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every rank must call it, in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_named(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) one at a time: what a rollout engine receives after an update; never more than
    one gathered tensor is alive here."""
    for name, t in named:
        yield name, full(t).detach()


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor (from a one-process checkpoint) cut the way `param` is sharded."""
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)


# ---------------------------------------------------------------------------------------- splitting work

def rows(n: int, group: int = 1) -> list[int]:
    """The rows of an n-row global batch this rank computes: r, r + W, r + 2W, ... With group > 1 (ranks that
    work together, e.g. a tensor-parallel rollout engine: ranks [g*group, (g+1)*group) are group g of
    W / group), the rows of this rank's group: g, g + W/group, ..."""
    groups = _WORLD.size // group
    return list(range(_WORLD.rank // group, n, groups))


def require_rows(n: int, what: str, flag: str) -> None:
    """Every rank needs rows of every batch (FSDP's collectives run once per forward on every rank)."""
    if n < _WORLD.size:
        raise ValueError(f"{flag} {n} is smaller than the number of processes ({_WORLD.size}): {what} is split "
                         f"across processes, and each needs at least one row. Raise {flag} or start fewer")


def gather_objects(mine: list, group: int = 1) -> list:
    """Each rank's share (its `rows(n, group)`, in order) put back into the global order, on every rank (with
    group > 1 the ranks of a group hold the same share: the first one's is taken)."""
    w = _WORLD
    if w.size == 1:
        return list(mine)
    import torch.distributed as dist

    parts: list = [None] * w.size
    dist.all_gather_object(parts, mine)
    parts = parts[::group]
    n = sum(len(p) for p in parts)
    return [parts[i % len(parts)][i // len(parts)] for i in range(n)]


def map_rows(fn: Callable[[list[int]], torch.Tensor], n: int) -> torch.Tensor:
    """fn(this rank's row indices) -> [len, ...]; returns the [n, ...] result of all ranks, on every rank.
    Every rank must call it with the same n (the forward passes inside are collective under FSDP)."""
    w = _WORLD
    mine = rows(n)
    out = fn(mine)
    if w.size == 1:
        return out
    import torch.distributed as dist

    per = -(-n // w.size)  # ceil: ranks past the remainder pad one row
    pad = out.new_zeros((per, *out.shape[1:]))
    pad[: out.shape[0]] = out
    parts = [torch.empty_like(pad) for _ in range(w.size)]
    dist.all_gather(parts, pad.contiguous())
    result = out.new_empty((n, *out.shape[1:]))
    for r in range(w.size):
        result[r::w.size] = parts[r][: len(range(r, n, w.size))]
    return result


def sum_rows(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `t` (each rank filling disjoint rows of the same shape), on every rank."""
    if _WORLD.size == 1:
        return t
    import torch.distributed as dist

    t = t.contiguous()
    dist.all_reduce(t)
    return t


def part(mean: torch.Tensor, local_count: float, total: float) -> torch.Tensor:
    """This rank's part of a global mean, from its local `mean` over `local_count` of the `total` items
    (tokens, sequences or prompts of the global batch): the parts of all ranks sum to the global mean. In a
    world of one, `mean` itself."""
    if total <= 0:
        return mean * 0.0
    return mean if local_count == total else mean * (local_count / total)


def backward(part_of_loss: torch.Tensor) -> None:
    """Backpropagate this rank's part of a global loss. FSDP averages gradients over the W ranks, so the part
    is scaled by W first: the result is the gradient of the global loss."""
    (part_of_loss * _WORLD.size if _WORLD.size > 1 else part_of_loss).backward()


def all_sum(values: dict[str, float]) -> dict[str, float]:
    """Sums over ranks of numbers that are each rank's share of a global quantity (one collective)."""
    if _WORLD.size == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks (NaN on any rank stays NaN)."""
    if _WORLD.size == 1:
        return t
    import torch.distributed as dist

    nan = torch.isnan(t).to(torch.float64)
    t = torch.nan_to_num(t.to(torch.float64), nan=0.0)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    dist.all_reduce(nan, op=dist.ReduceOp.MAX)
    return torch.where(nan > 0, torch.full_like(t, float("nan")), t)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a Ctrl-C that reached one rank stops all at one step)."""
    if _WORLD.size == 1:
        return flag
    return bool(all_max(torch.tensor([1.0 if flag else 0.0])).item())


def broadcast(obj):
    """The main rank's `obj` on every rank."""
    if _WORLD.size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _WORLD.size > 1:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first():
    """The main rank runs the block first (writing files), the others after it (reading them)."""
    if not _WORLD.main:
        barrier()
    yield
    if _WORLD.main:
        barrier()


def held_bytes(modules: Iterable[torch.nn.Module], optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
    """Bytes of parameters and optimizer state this process holds (its shards when sharded): what FSDP
    divides by the number of processes."""
    total = 0
    for m in modules:
        total += sum(local(p).numel() * p.element_size() for p in m.parameters())
    for o in optimizers:
        for state in o.state.values():
            total += sum(local(v).numel() * v.element_size() for v in state.values()
                         if torch.is_tensor(v) and v.dim() > 0)
    return total
