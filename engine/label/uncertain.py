"""What to label next: the prompts whose K answers the current reward model separates least come first.

Each item's answers are scored by the RM (`--rm DIR`, a reward-model directory `rm` wrote, with its own
tokenizer); the spread of an item's K scores (their standard deviation) is how sure the RM is of their order,
and the items are sorted by it, smallest first, so labelers' first rankings go where the RM learns most.
"""
from __future__ import annotations

import statistics

import torch


@torch.no_grad()
def rm_spreads(rm_dir, items: list[dict], chunk: int = 64) -> list[float]:
    """The standard deviation of the RM's scores of each item's responses."""
    from ..models.batch import make_batch
    from ..config import DataConfig, RunConfig
    from ..data.encode import make_encoder
    from ..models.loading import load_model, load_tokenizer
    from ..models.forward import SequenceScores

    tok = load_tokenizer(rm_dir, "--rm")
    rm = SequenceScores(load_model(rm_dir, flag="--rm", scalar=True, device="cpu", run=RunConfig(), tokenizer=tok,
                                   head_required=True)).eval()
    enc = make_encoder(tok, DataConfig(long_prompts="truncate"), None, 1, "--rm")
    rows = []
    for item in items:
        p = enc.prompt(item["prompt"])
        for text, done in zip(item["responses"], item.get("finished") or [True] * len(item["responses"])):
            rows.append((p, enc.response(item["prompt"], text, len(p), finished=done)))
    scores = []
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        scores += rm(make_batch([p for p, _ in part], [r for _, r in part], tok.pad_token_id)).tolist()
    out, at = [], 0
    for item in items:
        k = len(item["responses"])
        out.append(statistics.pstdev(scores[at:at + k]))
        at += k
    return out


def most_uncertain_first(rm_dir, items: list[dict]) -> list[dict]:
    """items sorted by the RM's spread, smallest first (ties keep their order); each gains "rm_spread"."""
    spreads = rm_spreads(rm_dir, items)
    order = sorted(range(len(items)), key=lambda i: spreads[i])
    return [{**items[i], "rm_spread": spreads[i]} for i in order]
