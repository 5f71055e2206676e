"""A stage's final models: plain transformers directories (save_pretrained's layout, safetensors, with the
tokenizer), whatever the number of processes. One process writes them with save_pretrained; several write
their shards and the main rank consolidates them, so that no rank ever holds a whole model. Either way the
folder appears whole or not at all."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..parallel import distributed as dist
from .atomic import atomic_dir
from .checkpoint import write_models
from .sharded import files, written_together


def save_models(target: Path, models: dict, tokenizer=None) -> None:
    """Plain transformers directories (with the tokenizer), atomically. With several processes every rank
    calls it and writes its shards, which the main rank consolidates (`save_plain_models`: no rank holds a
    whole model)."""
    if dist.world().size > 1:
        save_plain_models(target, models, tokenizer)
        return
    atomic_dir(target, lambda tmp: write_models(tmp, models, tokenizer))


def save_plain_models(target: Path, models: dict, tokenizer=None) -> None:
    """Plain transformers directories of sharded models, written without any rank holding a whole model: every
    rank writes its shards (DCP's safetensors writer, files bounded by `files`), then the main rank
    consolidates them a tensor piece at a time (torch's own consolidation of DCP's safetensors) into
    `model.safetensors` (or save_pretrained's `model-0000i-of-0000n.safetensors` with its index, past 5 GiB),
    adds config.json and the tokenizer, and renames the folder into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    with written_together(target) as tmp:
        for name, model in models.items():
            tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - \
                {n for n, _ in model.named_parameters()}
            state = {k: v for k, v in get_model_state_dict(model).items() if k not in tied}
            shards = tmp / name / "sharded"
            dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(shards), save_distributed=True,
                                                                    fqn_to_index_mapping=files(state)))
            dist.barrier()
            if dist.world().main:  # into files of save_pretrained's default size, a tensor piece at a time
                index = files(state, max_bytes=5 * 2**30 * dist.world().size)
                consolidate_safetensors_files(str(shards), str(tmp / name), fqn_to_index_mapping=index)
                _plain_layout(tmp / name, model, tokenizer, max(index.values()))
    dist.barrier()


def _plain_layout(folder: Path, model, tokenizer, n_files: int) -> None:
    """What save_pretrained leaves beside consolidated weights: one file named model.safetensors (several:
    model-0000i-of-0000n with the index), config.json, generation_config.json and the tokenizer."""
    shutil.rmtree(folder / "sharded")
    if n_files == 1:
        (folder / "model-00001-of-00001.safetensors").rename(folder / "model.safetensors")
        (folder / "model.safetensors.index.json").unlink()
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
