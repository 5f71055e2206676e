"""The built-in task: instructions with checkable intent, a simulated demonstrator and labelers."""
from __future__ import annotations

from .vocab import BOS, EOS, SEP


def encode_prompt(tokenizer, text: str) -> list[int]:
    """<bos> prompt words <sep>: the model answers after <sep>."""
    ids = tokenizer.convert_tokens_to_ids
    return [ids(BOS), *ids(text.split()), ids(SEP)]


def encode_response(tokenizer, text: str, finished: bool = True) -> list[int]:
    out = tokenizer.convert_tokens_to_ids(text.split()) if text.strip() else []
    return out + ([tokenizer.convert_tokens_to_ids(EOS)] if finished else [])


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Pretraining text as (prompt, response) = ([<bos>], words <eos>)."""
    return [tokenizer.convert_tokens_to_ids(BOS)], encode_response(tokenizer, text)


def decode_response(tokenizer, ids: list[int]) -> tuple[str, bool]:
    """(words, finished): stops at <eos>; special tokens inside a response are kept as written."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    finished = eos in ids
    if finished:
        ids = ids[: ids.index(eos)]
    return " ".join(tokenizer.convert_ids_to_tokens(ids)), finished
