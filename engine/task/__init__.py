"""The built-in task: instructions with checkable intent, a simulated demonstrator and labelers.

Its text goes through the same encoder as a user's (engine/data/encode.py), by its tokenizer's chat template;
only reading an answer back into words is the task's own (`decode_response`). It also makes the small random
checkpoints of real families (`tiny_checkpoint`), whose tokenizers learn the built-in corpus.

Above the trainers, whose win-rate evaluation and report it adds: nothing from the trainers down imports it
(tests/engine/test_layering.py), so a user's model never depends on the built-in world."""
from __future__ import annotations

from .vocab import EOS


def decode_response(tokenizer, ids: list[int]) -> tuple[str, bool]:
    """(words, finished): stops at <eos>; special tokens inside a response are kept as written."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    finished = eos in ids
    if finished:
        ids = ids[: ids.index(eos)]
    return " ".join(tokenizer.convert_ids_to_tokens(ids)), finished
