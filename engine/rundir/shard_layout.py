"""What a sharded checkpoint's safetensors headers claim, checked against the tensors it is loaded into.

DCP's safetensors reader rebuilds its index from each shard file's JSON header (dtype, shape, and in
`__metadata__["DCP_SHARDING_INFO"]` the shard's offsets in the whole tensor) and believes it: a header whose
F32 says I32 has its bytes read as integers and cast into the float weights; rows that no shard covers keep
whatever the model held before; a second file over the same rows wins or loses by file order. Each of those
loads "successfully". This module reads every header first (no tensor bytes) and refuses, by file and tensor,
a dtype other than the model's, a shard outside the tensor, and shards that do not tile the tensor exactly
(a gap or an overlap).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .atomic import CheckpointError

SHARDING_KEY = "DCP_SHARDING_INFO"  # where DCP's HuggingFaceStorageWriter puts each shard's offsets
MAX_CHUNKS = 1 << 16                # shards of one tensor: one per writing rank, so far more than any job
SAFETENSORS_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                     torch.uint8: "U8", torch.bool: "BOOL"}
FIX = "Resume from an earlier checkpoint or start over with --run.overwrite true."


def read_headers(files: list[Path]) -> dict[str, list[tuple[Path, list[int], list[int], str]]]:
    """key -> [(file, offsets, shape, dtype string)], one entry per shard, from the files' headers only."""
    from safetensors import safe_open

    chunks: dict[str, list] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get(SHARDING_KEY) or "null")
                slices = {key: f.get_slice(key) for key in f.keys()}
                entries = [(key, list(s.get_shape()), s.get_dtype()) for key, s in slices.items()]
        except (Exception, RecursionError) as exc:  # noqa: BLE001 - safetensors' and json's errors, all named here
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{path}: not a readable shard ({first[:200]}). {FIX}") from None
        for key, shape, dtype in entries:
            offsets = _offsets(path, key, info, len(shape))
            chunks.setdefault(key, []).append((path, offsets, shape, dtype))
    return chunks


def _offsets(path: Path, key: str, info, ndim: int) -> list[int]:
    if info is None:
        return [0] * ndim
    entry = info.get(key) if isinstance(info, dict) else None
    offsets = entry.get("saved_offsets") if isinstance(entry, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != ndim
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise CheckpointError(f"{path}: the header's {SHARDING_KEY} gives {key!r} no valid offsets (wanted {ndim} "
                              f"non-negative integers, found {str(offsets)[:80]}). {FIX}")
    return offsets


def check_layout(files: list[Path], wanted: dict[str, torch.Tensor], folder: Path) -> None:
    """Every tensor in `wanted` (key -> the tensor it loads into; global shapes, as DTensors give) is covered
    exactly once, in its own dtype, by the shards that `files` declare."""
    chunks = read_headers(files)
    for key, target in wanted.items():
        have = chunks.get(key)
        if not have:
            raise CheckpointError(f"{folder}: no shard holds {key.strip('/')!r}; the checkpoint is incomplete. {FIX}")
        if len(have) > MAX_CHUNKS:
            raise CheckpointError(f"{folder}: {key.strip('/')!r} is split into {len(have)} shards (at most "
                                  f"{MAX_CHUNKS}). {FIX}")
        shape, dtype = list(target.shape), SAFETENSORS_DTYPE.get(target.dtype, str(target.dtype))
        for path, offsets, size, stored in have:
            if stored != dtype:
                raise CheckpointError(f"{path}: {key.strip('/')!r} is stored as {stored}, but it loads into {dtype} "
                                      f"(its header was changed, or it is another model's). {FIX}")
            if len(size) != len(shape) or any(o + s > n for o, s, n in zip(offsets, size, shape)):
                raise CheckpointError(f"{path}: the shard of {key.strip('/')!r} at offsets {offsets} with shape "
                                      f"{size} lies outside the tensor's shape {shape}. {FIX}")
        _check_tiling(key.strip("/"), have, math.prod(shape), folder)


def _check_tiling(key: str, have: list, numel: int, folder: Path) -> None:
    """Boxes inside the tensor cover it exactly once iff no two overlap and their volumes add up to it."""
    for i, (pa, oa, sa, _) in enumerate(have):
        for pb, ob, sb, _ in have[i + 1:]:
            if all(s and t for s, t in zip(sa, sb)) and all(
                    a < b + t and b < a + s for a, s, b, t in zip(oa, sa, ob, sb)):
                raise CheckpointError(f"{pb}: its shard of {key!r} (offsets {ob}, shape {sb}) overlaps the one in "
                                      f"{pa.name} (offsets {oa}, shape {sa}); which one loads would be chance. {FIX}")
    covered = sum(math.prod(size) for _, _, size, _ in have)
    if covered != numel:
        raise CheckpointError(f"{folder}: the shards of {key!r} cover {covered} of its {numel} elements; the "
                              f"rest would keep whatever the model held before loading. {FIX}")
