"""Sharded checkpoints whose safetensors headers lie: refused by file and tensor before a byte is loaded.

DCP's safetensors reader believes each shard's header (dtype, shape, offsets): a changed dtype is read as
other bytes and cast, rows no shard covers keep the model's old values, an extra shard over the same rows wins
by file order, all with no error. Each case here loaded "successfully" before the layout check; a checkpoint
split differently but exactly still loads to the same weights. One process (DCP without a process group);
the two-process route is tests/engine/test_distributed.py."""
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.rundir.atomic import CheckpointError
from engine.rundir.sharded import load_sharded, save_sharded_checkpoint
from engine.rundir.state_file import read_state

WEIGHT = "/model.policy/0.weight"  # [7, 5]


def build(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 5)).sum().backward()
    optim.step()
    return model, optim


@pytest.fixture
def ckpt(tmp_path) -> Path:
    model, optim = build(0)
    return save_sharded_checkpoint(tmp_path / "sft", 1, {"policy": model}, {"policy": optim}, {})


def shard(ckpt: Path) -> Path:
    (only,) = (ckpt / "dcp").iterdir()
    return only


def load_into_fresh(ckpt: Path):
    model, optim = build(1)
    load_sharded(ckpt, {"policy": model}, {"policy": optim}, read_state(ckpt)["sharded"])
    return model


def rewrite_header(path: Path, edit) -> None:
    """The file with its JSON header changed by `edit(header)`, tensor bytes untouched."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def split_weight(ckpt: Path, parts) -> None:
    """WEIGHT moved out of the one shard file into one extra file per (first row, rows) in `parts`, each with
    its DCP offsets, as several ranks would write it."""
    path = shard(ckpt)
    tensors = load_file(path)
    info = json.loads(json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
                      ["__metadata__"]["DCP_SHARDING_INFO"])
    whole = tensors.pop(WEIGHT)
    info.pop(WEIGHT)
    save_file(tensors, path, metadata={"DCP_SHARDING_INFO": json.dumps(info)})
    for i, (first, rows) in enumerate(parts, start=2):
        name = ckpt / "dcp" / f"shard-0000{i}-model-00001-of-00001.safetensors"
        save_file({WEIGHT: whole[first:first + rows].clone()}, name,
                  metadata={"DCP_SHARDING_INFO": json.dumps({WEIGHT: {"saved_offsets": [first, 0]}})})


def test_an_intact_checkpoint_and_one_split_exactly_into_rank_shards_load_the_saved_weights(ckpt):
    saved, _ = build(0)
    assert torch.equal(load_into_fresh(ckpt)[0].weight, saved[0].weight)
    split_weight(ckpt, [(0, 4), (4, 3)])
    loaded = load_into_fresh(ckpt)
    assert torch.equal(loaded[0].weight, saved[0].weight) and torch.equal(loaded[1].weight, saved[1].weight)


def test_a_shard_header_whose_dtype_was_changed_is_refused_naming_file_tensor_and_both_dtypes(ckpt):
    rewrite_header(shard(ckpt), lambda h: h[WEIGHT].update(dtype="I32"))
    with pytest.raises(CheckpointError) as err:
        load_into_fresh(ckpt)
    assert f"{shard(ckpt)}: 'model.policy/0.weight' is stored as I32, but it loads into F32" in str(err.value)


@pytest.mark.parametrize("parts, says", [
    ([(0, 4), (5, 2)], "cover 30 of its 35 elements"),                        # row 4 in no shard
    ([(0, 4), (3, 4)], "overlaps the one in shard-00002"),                     # row 3 in two shards
    ([(0, 7), (0, 7)], "overlaps the one in shard-00002"),                     # an extra shard over all of it
    ([(0, 4)], "cover 20 of its 35 elements"),                                 # a rank's file missing
    ([(0, 4), (4, 3), (6, 1)], "overlaps"),                                    # a third rank's row again
])
def test_shards_that_leave_a_gap_or_overlap_are_refused(ckpt, parts, says):
    split_weight(ckpt, parts)
    with pytest.raises(CheckpointError) as err:
        load_into_fresh(ckpt)
    assert says in str(err.value) and "model.policy/0.weight" in str(err.value)


def test_a_shard_outside_the_tensor_or_with_bad_offsets_is_refused(ckpt):
    split_weight(ckpt, [(0, 4), (4, 3)])
    extra = ckpt / "dcp" / "shard-00003-model-00001-of-00001.safetensors"
    rewrite_header(extra, lambda h: h["__metadata__"].update(
        DCP_SHARDING_INFO=json.dumps({WEIGHT: {"saved_offsets": [5, 0]}})))
    with pytest.raises(CheckpointError, match="lies outside the tensor's shape"):
        load_into_fresh(ckpt)
    for bad in ([4], [4, -1], [4, "0"], None, [4.0, 0]):
        rewrite_header(extra, lambda h: h["__metadata__"].update(
            DCP_SHARDING_INFO=json.dumps({WEIGHT: {"saved_offsets": bad}})))
        with pytest.raises(CheckpointError, match=f"{extra}: the header's DCP_SHARDING_INFO gives"):
            load_into_fresh(ckpt)


def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if kind == "header length 2^63-1":
        path.write_bytes(struct.pack("<Q", 2**63 - 1) + data[8:])
    elif kind == "garbage JSON":
        path.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:])
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "offsets past the end":
        rewrite_header(path, lambda h: h[WEIGHT].update(data_offsets=[0, 10**9]))
    elif kind == "sharding info not JSON":
        rewrite_header(path, lambda h: h["__metadata__"].update(DCP_SHARDING_INFO="{nope"))
    elif kind == "sharding info nested 20000 deep":
        rewrite_header(path, lambda h: h["__metadata__"].update(DCP_SHARDING_INFO="[" * 20000 + "]" * 20000))
    elif kind == "shape of another size":
        rewrite_header(path, lambda h: h[WEIGHT].update(shape=[7, 4]))


@pytest.mark.parametrize("kind", ["header length 2^63-1", "garbage JSON", "truncated", "empty", "offsets past the end",
                                  "sharding info not JSON", "sharding info nested 20000 deep",
                                  "shape of another size"])
def test_a_damaged_shard_is_named_in_one_error(ckpt, kind):
    damage(shard(ckpt), kind)
    with pytest.raises(CheckpointError) as err:
        load_into_fresh(ckpt)
    assert str(shard(ckpt)) in str(err.value) and "--run.overwrite true" in str(err.value), str(err.value)
