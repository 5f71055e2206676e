"""Loading a model sharded from the start: no process ever holds the whole model.

With several processes, `loading.load_model` builds the transformers model on the meta device (shapes, no
memory) and notes where its weights are (`WeightSource`). `sharding.shard` then applies FSDP2 as usual,
allocates only this rank's shards (`to_empty`), and `materialize` fills each shard from the checkpoint's
safetensors, reading only the rows this rank holds (`safe_open(...).get_slice`, memory-mapped). This is
torchtitan's meta-init -> fully_shard -> to_empty -> load, with the checkpoint read as safetensors (data, not
code). A world of one keeps `from_pretrained`.

What `from_pretrained` checks is checked here too, from the files' headers: every weight present, every
shape the config's; a scalar model's missing `score` head is initialised by `init_missing_head` (the same
function one process uses, so results do not depend on the number of processes). Non-persistent buffers
(rotary frequencies) are built on the CPU at construction, kept aside across `to_empty`, and put back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

ATTR = "_engine_weight_source"


@dataclass
class WeightSource:
    """Where a meta-built model's weights are: the checkpoint directory, its tensor -> file index, and the
    (small) non-persistent buffers built at construction."""
    path: Path
    flag: str
    files: dict[str, Path]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    missing_head: list[str] = field(default_factory=list)


def index(path: Path, flag: str) -> tuple[dict[str, Path], dict[str, list[int]]]:
    """(tensor name -> the safetensors file holding it, tensor name -> its shape), from the headers of
    `model.safetensors` or of an index's shards."""
    from safetensors import SafetensorError, safe_open

    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        try:
            files = sorted({path / f for f in json.loads(idx.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{flag} {path}: model.safetensors.index.json is damaged ({exc}); write the "
                             f"checkpoint again with save_pretrained") from None
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise ValueError(f"{flag} {path}: no model.safetensors here; with several processes weights are read "
                         f"as safetensors only (save the model with save_pretrained(safe_serialization=True))")
    out: dict[str, Path] = {}
    shapes: dict[str, list[int]] = {}
    for f in files:
        if f.parent.resolve() != path.resolve() or not f.is_file() or f.is_symlink():
            raise ValueError(f"{flag} {path}: the index names {f.name}, which is not a regular file in this "
                             f"directory; is the checkpoint complete?")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    out[key], shapes[key] = f, list(sf.get_slice(key).get_shape())
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{flag} {path}: {f.name} cannot be read ({exc}); is the checkpoint complete? Write "
                             f"it again with save_pretrained") from None
    return out, shapes


def _non_persistent(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            t = getattr(mod, b, None)
            if t is not None:
                out[f"{mod_name}.{b}" if mod_name else b] = t.clone()
    return out


def build(cls, config, path: Path, flag: str, *, head_required: bool, **kw):
    """cls built from `config` with meta parameters (buffers real, on the CPU), checked against the files'
    headers, carrying its WeightSource."""
    from accelerate import init_empty_weights

    files, shapes = index(path, flag)  # safetensors only, always
    kw.pop("use_safetensors", None)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, **kw)
    model.tie_weights()  # from_pretrained ties after loading; here the tied head must be the embedding before sharding
    source = WeightSource(path, flag, files, _non_persistent(model))
    for name, p in model.named_parameters():
        key = _key(name, files, model)
        if key is None:
            if name.startswith("score."):
                source.missing_head.append(name)
                continue
            raise ValueError(f"{flag} {path}: weights are missing from the checkpoint (e.g. {name}) and would be "
                             f"random; is this a {config.model_type} checkpoint of the architecture config.json "
                             f"names, written completely?")
        if shapes[key] != list(p.shape):
            raise ValueError(f"{flag} {path}: weights do not fit the shapes config.json gives (e.g. {key}: "
                             f"{shapes[key]} in the weights file, {list(p.shape)} from the config); the config "
                             f"and the weights come from different models")
    if source.missing_head and head_required:
        raise ValueError(f"{flag} {path}: this checkpoint has no trained score head ({source.missing_head[0]} is "
                         f"not in it), so its rewards would come from a random head. Give a reward model "
                         f"(`python -m engine rm` writes OUT/rm/final/reward)")
    setattr(model, ATTR, source)
    return model


def _key(name: str, files: dict, model) -> str | None:
    """The checkpoint's name for parameter `name` (a base-model checkpoint lacks the `model.` prefix)."""
    if name in files:
        return name
    prefix = getattr(model, "base_model_prefix", "") + "."
    if name.startswith(prefix) and name[len(prefix):] in files:
        return name[len(prefix):]
    return None


def init_missing_head(model, names) -> None:
    """A scalar head the checkpoint does not have (a value model started from a policy): normal with the
    config's initializer_range from a fixed generator, bias zero; the same in any number of processes."""
    from ..parallel.distributed import shard_like

    std = float(getattr(model.config, "initializer_range", 0.02))
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in sorted(names):
            p = params[name]
            whole = torch.zeros(p.shape) if name.endswith("bias") else torch.randn(p.shape, generator=g) * std
            _local_copy(p, shard_like(whole, p) if hasattr(p, "device_mesh") else whole)


def _local_copy(p: torch.Tensor, value: torch.Tensor) -> None:
    dst = p.to_local() if hasattr(p, "to_local") else p
    src = value.to_local() if hasattr(value, "to_local") else value
    dst.copy_(src.to(dst.dtype))


def pending(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The meta-built models inside `module` still waiting for their weights."""
    return [m for m in module.modules() if getattr(m, ATTR, None) is not None]


@torch.no_grad()
def materialize(module: torch.nn.Module, device: torch.device) -> None:
    """After fully_shard: allocate this rank's shards of every meta-built model in `module` and read them, row
    range by row range, from the checkpoint; put the non-persistent buffers back; then run the checks that
    need weights (`check_causal`)."""
    from safetensors import safe_open
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from .causal import check_causal
    from .forward import run_inside

    models = pending(module)
    if not models:
        return
    module.to_empty(device=device)
    checks = []
    for model in models:
        source: WeightSource = getattr(model, ATTR)
        for name, p in model.named_parameters():
            if name in source.missing_head:
                continue
            key = _key(name, source.files, model)
            # the file opened per tensor: the pages of it that were read are let go as soon as they are copied
            rows = slice(None)
            if hasattr(p, "device_mesh"):
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                if shape[0] == 0:  # FSDP2 gave this rank none of its rows
                    continue
                rows = slice(offset[0], offset[0] + shape[0])
            with safe_open(str(source.files[key]), framework="pt") as sf:
                _local_copy(p, sf.get_slice(key)[rows])
        init_missing_head(model, source.missing_head)
        buffers = dict(model.named_buffers())
        for name, value in source.buffers.items():
            buffers[name].copy_(value)
        delattr(model, ATTR)
        checks.append(lambda inner, s=source: check_causal(inner, s.flag, s.path))
    for check in checks:  # inside the root's forward, where FSDP gathers what the root holds
        run_inside(module, check)
