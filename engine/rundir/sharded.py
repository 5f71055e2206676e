"""Checkpoints of several processes (torch.distributed.checkpoint, DCP) in files that cannot carry code.

DCP's default storage is a pickle: `FileSystemReader.read_metadata` is a plain `pickle.load` of `.metadata`,
and every non-tensor entry (an optimizer's lr, betas, eps, ...) is read back by `torch.load(weights_only=
False)`; PyTorch documents DCP for trusted files only. Run directories come from other people, so this module
writes and reads DCP through its safetensors storage instead (`HuggingFaceStorageWriter(save_distributed=
True)` / `HuggingFaceStorageReader`): each rank writes its shards as `shard-NNNNN-model-00001-of-00001.
safetensors`, whose JSON headers carry the shards' offsets; the reader rebuilds DCP's metadata from those
headers and reads tensors with `safe_open`. Nothing is unpickled, and DCP still reshards on load (a
checkpoint of W processes resumes with any number, one included).

Only tensors go to DCP. The rest of each state dict (an optimizer's param_groups, its non-tensor state) is
kept in trainer.json (engine.rundir.state_file) as a tree in which every tensor is the placeholder {"$dcp": key}.
Loading checks the folder first: only regular `*.safetensors` files may be in it; DCP's pickle files
(`.metadata`, `*.distcp`, from rlhf-engine before 2026-12-02 or from anyone else) are refused by name, unread.
Then the shards' headers are checked against the tensors they load into (engine.rundir.shard_layout).

Layout: checkpoints/step-N/{dcp/shard-*.safetensors, trainer.json, trainer.safetensors}
"""
from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..parallel import distributed as dist
from .atomic import CheckpointError, rename_into_place, write_errors
from .checkpoint import publish, rng_state
from .shard_layout import check_layout
from .state_file import write_state

SHARDED = "dcp"
SHARD_FILE = re.compile(r"shard-\d{5,}-model-\d{5,}-of-\d{5,}\.safetensors")
PLACEHOLDER = "$dcp"
PICKLED = {".metadata": "DCP's pickled index", ".distcp": "DCP's pickled shards"}


def is_sharded(ckpt: Path) -> bool:
    """A checkpoint written by several processes (DCP shards)."""
    return (ckpt / SHARDED).is_dir()


def split_tensors(tree, key: str, tensors: dict, seen: dict | None = None):
    """`tree` with every tensor replaced by {"$dcp": its key}; the tensors go into `tensors` under those keys
    (`key/child/...`, so the same tree shape gives the same keys). A tensor met twice (tied embeddings: the
    LM head is the embedding) is stored once, under its first key, which both places name."""
    seen = {} if seen is None else seen
    if isinstance(tree, torch.Tensor):
        first = seen.setdefault(_memory(tree), key)
        tensors.setdefault(first, tree)
        return {PLACEHOLDER: first}
    if isinstance(tree, dict):
        return {k: split_tensors(v, f"{key}/{k}", tensors, seen) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(split_tensors(v, f"{key}/{i}", tensors, seen) for i, v in enumerate(tree))
    return tree


def _memory(t: torch.Tensor):
    """What identifies a tensor's memory: its local shard's storage, offset, shape, strides and dtype (two
    state-dict entries of one tied parameter are two tensor objects over the same memory)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    if local.numel() == 0:
        return id(t)
    return (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.stride(),
            local.dtype)


def join_tensors(tree, tensors: dict, where: Path):
    """The inverse of split_tensors: placeholders replaced by `tensors[key]`."""
    if isinstance(tree, dict):
        if set(tree) == {PLACEHOLDER}:
            key = tree[PLACEHOLDER]
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointError(f"{where}: names a tensor {str(key)[:120]!r} that this stage's models and "
                                      f"optimizers do not have; it was written by another stage, model or version. "
                                      f"Start the stage over with --run.overwrite true.")
            return tensors[key]
        return {k: join_tensors(v, tensors, where) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(join_tensors(v, tensors, where) for v in tree)
    return tree


def _states(models: dict, optimizers: dict) -> dict:
    """Every model's and optimizer's state dict (this rank's shards), by "model.<name>" / "optim.<name>"."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {f"model.{name}": get_model_state_dict(m) for name, m in models.items()}
    out.update({f"optim.{name}": get_optimizer_state_dict(models[name], o) for name, o in optimizers.items()})
    return out


def save_sharded_checkpoint(stage_dir: Path, step: int, models: dict, optimizers: dict, state: dict) -> Path:
    """Every rank writes its shards of the models' and optimizers' tensors into one DCP folder (safetensors)
    under a temporary name; after a barrier the main rank adds the trainer state (with the states' non-tensor
    parts), renames it into place and points `latest` at it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    ckpts = stage_dir / "checkpoints"
    target = ckpts / f"step-{step:06d}"
    tensors: dict = {}
    skeleton = split_tensors(_states(models, optimizers), "", tensors)
    with written_together(target) as tmp:
        writer = HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True,
                                          fqn_to_index_mapping=files(tensors))
        dcp.save(tensors, storage_writer=writer)
        if dist.world().main:
            write_state(tmp, {**state, "step": step, "rng": rng_state(), "world_size": dist.world().size,
                              "sharded": skeleton})
    if dist.world().main:
        publish(ckpts, target)
    dist.barrier()
    return target


@contextlib.contextmanager
def written_together(target: Path):
    """A temporary folder beside `target` that every rank writes into (the main rank makes it and tells the
    others); after the block and a barrier the main rank renames it into place. On failure it is removed and
    `target` is left as it was."""
    tmp = None
    if dist.world().main:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    tmp = Path(dist.broadcast(tmp))
    try:
        with write_errors(target):
            yield tmp
        dist.barrier()
        if dist.world().main:
            rename_into_place(tmp, target)
    except BaseException:
        if dist.world().main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


FILE_BYTES = 64 * 2**20


def files(tensors: dict, max_bytes: int = FILE_BYTES) -> dict[str, int]:
    """key -> file number (from 1), each file at most max_bytes of one rank's shards (a tensor larger than that
    alone): DCP's safetensors writer builds each file in memory before writing it, so this bounds what a save
    adds to a rank's memory. The same on every rank (from the whole tensors' sizes)."""
    out, index, size = {}, 1, 0
    world = dist.world().size
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size() // world
        if size and size + nbytes > max_bytes:
            index, size = index + 1, 0
        out[key] = index
        size += nbytes
    return out


def check_sharded_files(ckpt: Path) -> None:
    """The DCP folder holds only regular `shard-*.safetensors` files; anything else is refused by name before
    a byte of it is read (DCP's own pickle files above all: reading them could run code)."""
    folder = ckpt / SHARDED
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{folder} must be a folder of the checkpoint itself, not a link")
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not p.is_file():
            kind = "a symbolic link" if p.is_symlink() else "not a regular file"
            raise CheckpointError(f"{p} is {kind}; a checkpoint's DCP folder holds only its own "
                                  f"shard-*.safetensors files. Remove it, or start over with --run.overwrite true.")
        pickled = PICKLED.get(p.suffix or p.name)
        if pickled:
            raise CheckpointError(
                f"refused {p}: {pickled}, a pickle that could run code when read (rlhf-engine before 2026-12-02 "
                f"wrote sharded checkpoints this way, and so can anyone who crafts one). It was not read. Start the "
                f"stage over with --run.overwrite true, or resume only checkpoints written in the safetensors format.")
        if not SHARD_FILE.fullmatch(p.name):
            raise CheckpointError(f"{p}: not a file of a sharded checkpoint (only shard-NNNNN-model-NNNNN-of-NNNNN."
                                  f"safetensors files belong there). Remove it, or start over with --run.overwrite true.")


def load_sharded(ckpt: Path, models: dict, optimizers: dict, skeleton) -> None:
    """Load a sharded checkpoint's models and optimizers into `models` / `optimizers` (sharded or not: DCP
    reshards to however many processes read it). `skeleton`: the trainer state's "sharded" tree."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    check_sharded_files(ckpt)
    where = ckpt / "trainer.json"
    if not isinstance(skeleton, dict):
        raise CheckpointError(f"{where}: holds no index of the sharded state (\"sharded\"); it was written by "
                              f"another version. Start the stage over with --run.overwrite true.")
    targets: dict = {}
    split_tensors(_states(models, optimizers), "", targets)
    wanted: dict = {}
    state = join_tensors(skeleton, targets, where)
    split_tensors(state, "", wanted)
    missing = sorted(set(targets) - set(wanted))
    if missing:
        raise CheckpointError(f"{where}: holds no {missing[0].strip('/')!r} ({len(missing)} tensor(s) of this stage's "
                              f"models and optimizers missing); it was written by another stage, model or version. "
                              f"Start the stage over with --run.overwrite true.")
    check_layout(sorted((ckpt / SHARDED).iterdir()), wanted, ckpt / SHARDED)
    try:
        dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(ckpt / SHARDED)), no_dist=dist.world().size == 1)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's wrappers (CheckpointException is a
        # BaseException: `except Exception` let a damaged shard end in a traceback)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{ckpt / SHARDED}: cannot be read into this stage's models ({first[:300]}). "
                              f"Resume from an earlier checkpoint or start over with --run.overwrite true.") from None
    for name, m in models.items():
        if f"model.{name}" not in state:
            raise CheckpointError(f"{where}: holds no weights of the {name} model. Start over with --run.overwrite true.")
        set_model_state_dict(m, state[f"model.{name}"])
    for name, o in optimizers.items():
        if f"optim.{name}" not in state:
            raise CheckpointError(f"{where}: holds no optimizer state of the {name} model. Start over with "
                                  f"--run.overwrite true.")
        set_optimizer_state_dict(models[name], o, state[f"optim.{name}"])
