"""In-place weight sync for a running vLLM model: where each trainer tensor lives in the engine, and copying it there.

vLLM's own update paths (`reload_weights`, and the NCCL/IPC weight-transfer engines, which run the same
layer-wise reload around their transport) re-initialise every layer and redo its post-processing on every
sync. For a parameter whose runtime storage is a plain slice of what the trainer holds, that is wasted work:
a `copy_` into the slice is the whole update, at memory speed, in the engine's dtype.

The plan is learnt from vLLM itself, once per trainer name, on the first sync that carries it: the name and
its tensor go through the model's own `load_weights` (which knows the checkpoint naming, the fused
`qkv_proj` / `gate_up_proj` slices, vocabulary padding, tensor-parallel shards and tied embeddings) while
`torch.Tensor.copy_` is watched. A name whose load was exactly copies of views of the given tensor into views
of the model's parameters gets those (destination view, source view) pairs; later syncs replay them
directly. Anything else goes through vLLM's layer-wise reload, as before, for that name only:
- a layer the backend repacks after loading (vLLM's CPU backend puts linear layers and the LM head into
  oneDNN's blocked layout: the parameter is emptied or unused, the forward runs on a packed copy);
- a load that made no copy of the tensor itself (a converted temporary) or wrote outside the parameters;
- a parameter whose storage has moved since the plan was made (re-learnt).
A name the model's loader skips (the LM head of tied embeddings) is skipped here too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Target:
    """One copy of a sync: trainer tensor (or its `src` view) -> `view`, a slice of an engine parameter."""

    view: torch.Tensor
    storage: int                             # data_ptr of the parameter's storage when learnt
    src: tuple[int, tuple, tuple] | None     # (offset, size, stride) within the trainer tensor; None = all of it


@dataclass
class SyncPlan:
    targets: dict[str, list[Target]] = field(default_factory=dict)  # in place
    skipped: set[str] = field(default_factory=set)                   # the engine's loader ignores them
    reloaded: set[str] = field(default_factory=set)                  # through the layer-wise reload


def packed_modules(model: torch.nn.Module) -> set[str]:
    """Modules whose forward runs on a repacked copy of their weight, not on the parameter (vLLM's CPU backend:
    `cpu_linear` bound to a oneDNN / sgl / zentorch handle; its plain fallback calls F.linear on the weight)."""
    out = set()
    for name, module in model.named_modules():
        fn = getattr(module, "cpu_linear", None)
        if fn is None:
            continue
        code = getattr(fn, "__code__", None)
        names = set(code.co_names) if code is not None else set()
        if not names or not names <= {"torch", "nn", "functional", "linear"}:
            out.add(name)
    return out


def _storages(model: torch.nn.Module) -> dict[int, str]:
    return {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}


def learn(model: torch.nn.Module, name: str, tensor: torch.Tensor, storages: dict[int, str], packed: set[str]):
    """Load (name, tensor) through the model's loader, watching the copies it makes. storages: the model's
    parameters by storage (`_storages`); packed: `packed_modules(model)`.

    Returns a list of Targets (the load was plain copies: replay them), "skip" (the loader ignored the name)
    or None (not plain: use the layer-wise reload). The load itself is real: on a plain parameter the value is
    in place when this returns."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = torch.Tensor.copy_

    def watch(dst, src, non_blocking=False):
        seen.append((dst, src))
        return original(dst, src, non_blocking)

    torch.Tensor.copy_ = watch
    try:
        loaded = model.load_weights([(name, tensor)])
    except Exception:  # noqa: BLE001 - e.g. a repacked layer's emptied parameter has no weight_loader
        return None
    finally:
        torch.Tensor.copy_ = original
    if not seen:
        return "skip" if not loaded else None
    src_storage = tensor.untyped_storage().data_ptr()
    targets = []
    for dst, src in seen:
        param = storages.get(dst.untyped_storage().data_ptr())
        if param is None or src.untyped_storage().data_ptr() != src_storage:
            return None
        if param.rpartition(".")[0] in packed:
            return None
        whole = src.shape == tensor.shape and src.stride() == tensor.stride() and \
            src.storage_offset() == tensor.storage_offset()
        spec = None if whole else (src.storage_offset() - tensor.storage_offset(), tuple(src.shape), src.stride())
        targets.append(Target(dst, dst.untyped_storage().data_ptr(), spec))
    return targets


def copy_in(targets: list[Target], tensor: torch.Tensor) -> None:
    for t in targets:
        src = tensor if t.src is None else tensor.as_strided(t.src[1], t.src[2], tensor.storage_offset() + t.src[0])
        t.view.copy_(src)


def apply(model: torch.nn.Module, plan: SyncPlan, named_tensors) -> list[tuple[str, torch.Tensor]]:
    """Copy every planned (or newly learnt plain) tensor into place; return the pairs that need the reload."""
    storages = _storages(model)
    packed = None  # only a name being learnt needs it
    rest = []
    for name, tensor in named_tensors:
        tensor = tensor.contiguous()
        targets = plan.targets.get(name)
        if targets is not None:
            if all(t.storage in storages for t in targets):
                copy_in(targets, tensor)
                continue
            del plan.targets[name]  # the engine replaced the parameter: learn it again
        if name in plan.skipped:
            continue
        if name in plan.reloaded:
            rest.append((name, tensor))
            continue
        packed = packed_modules(model) if packed is None else packed
        got = learn(model, name, tensor, storages, packed)
        if got == "skip":
            plan.skipped.add(name)
        elif got is None:
            plan.reloaded.add(name)
            rest.append((name, tensor))
        else:
            plan.targets[name] = got
    return rest


def check_whole_layers(model: torch.nn.Module, names: list[str]) -> None:
    """A layer-wise reload of a layer that gets only some of its tensors leaves the rest uninitialised: refuse
    a partial sync that would do that (only repacked layers are reloaded)."""
    mapping = getattr(model, "packed_modules_mapping", {}) or {}
    shard_of = {shard: fused for fused, shards in mapping.items() for shard in shards}
    given = set(names)
    missing = []
    for name in names:
        module, _, leaf = name.rpartition(".")
        parent, _, last = module.rpartition(".")
        fused = shard_of.get(last)
        shards = mapping[fused] if fused else [last]
        engine_module = f"{parent}.{fused}" if fused else module
        try:
            leaves = [n for n, _ in model.get_submodule(engine_module).named_parameters(recurse=False)]
        except AttributeError:
            continue
        need = {".".join(x for x in (parent, s, p) if x) for s in shards for p in leaves}
        missing += sorted(need - given)
    if missing:
        raise ValueError("update_weights: a partial sync of a layer the engine repacks must carry all of its "
                         f"tensors; missing {sorted(set(missing))[:8]} (send whole layers, or use the plain "
                         "CPU layout: VLLMRollout(cpu_packed_gemm=False))")
