"""Reward-model training on K-way rankings (InstructGPT section 3.5).

Each batch element is one prompt with all its K ranked responses: the K sequences go through the model
once and the loss covers all K-choose-2 pairs (`kernels.ranking_loss`). After training, the scores are
shifted so that the labelers' demonstrations average 0 (stored as the model config's `score_offset`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from kernels import ranking_loss

from ..models.batch import make_batch
from ..models.forward import SequenceScores
from ..models.loading import placed
from ..models.lora import is_peft, plain, unwrap
from ..models.sharding import shard
from ..parallel import distributed as dist
from ..rundir.atomic import write_text_atomic
from ..rundir.final import save_models
from .loop import run_steps
from .state import open_stage, saved_model, train_one

log = logging.getLogger("engine")


def score_comparisons(rm: SequenceScores, rows: list[dict], pad_id: int):
    """Score every response of every prompt at once -> (scores [B, Kmax], ranks [B, Kmax], valid [B, Kmax]).
    rows: {prompt, responses, ranks} of token ids (ranks: 0 = best)."""
    return per_prompt(rm(comparison_batch(rows, pad_id, next(rm.parameters()).device)), rows)


def comparison_batch(rows: list[dict], pad_id: int, device):
    """Every response of every prompt as one SequenceBatch (prompt 0's K responses first)."""
    return make_batch([r["prompt"] for r in rows for _ in r["responses"]],
                      [resp for r in rows for resp in r["responses"]], pad_id).to(device)


def per_prompt(flat: torch.Tensor, rows: list[dict]):
    """One value per response, flat [sum K] in comparison_batch's order -> (values [B, Kmax], ranks [B, Kmax],
    valid [B, Kmax]): the ranking losses' layout."""
    kmax = max(len(r["responses"]) for r in rows)
    values = torch.zeros(len(rows), kmax, dtype=flat.dtype, device=flat.device)
    ranks = torch.full((len(rows), kmax), kmax, dtype=torch.long, device=flat.device)
    valid = torch.zeros(len(rows), kmax, dtype=torch.bool, device=flat.device)
    i = 0
    for b, r in enumerate(rows):
        k = len(r["responses"])
        values[b, :k] = flat[i:i + k]
        ranks[b, :k] = torch.tensor(r["ranks"])
        valid[b, :k] = True
        i += k
    return values, ranks, valid


def n_pairs(row: dict) -> int:
    """The ranked pairs of one comparison row (K-choose-2 without ties)."""
    ranks = row["ranks"]
    return sum(a < b for a in ranks for b in ranks)


@torch.no_grad()
def pairwise_accuracy(rm: SequenceScores, rows: list[dict], pad_id: int, rank_key: str = "ranks",
                      chunk: int = 64) -> float:
    """Fraction of ranked pairs the model orders like the labeler did."""
    was = rm.training
    rm.eval()
    right = total = 0.0
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        scores, ranks, valid = score_comparisons(rm, [{**r, "ranks": r[rank_key]} for r in part], pad_id)
        better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        right += ((scores[:, :, None] > scores[:, None, :]) & better).sum().item()
        total += better.sum().item()
    rm.train(was)
    return right / max(total, 1)


@torch.no_grad()
def mean_score(rm: SequenceScores, prompts, responses, pad_id: int, chunk: int = 256) -> float:
    was = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    vals = [rm(make_batch(prompts[i:i + chunk], responses[i:i + chunk], pad_id).to(device))
            for i in range(0, len(prompts), chunk)]
    rm.train(was)
    return torch.cat(vals).mean().item()


def train_reward(ctx, load_model, cfg, rows: list[dict], demos: tuple[list, list] | None, evaluate=None) -> Path:
    """Train the RM on ranked `rows` ({prompt, responses, ranks}: token ids, ranks 0 = best); returns the
    final RM directory. cfg: RewardConfig.

    load_model(resume): the model, from a checkpoint's model directory or (None) from the SFT model.
    demos: (prompt ids, response ids) lists of the labelers' demonstrations: the scores are shifted so they
    average 0 (None: no shift). evaluate(rm: SequenceScores) -> dict: extra metrics written to eval.json.
    """
    stage_dir, final, ckpt = open_stage(ctx, "rm", "reward")
    if final.is_dir():
        return final
    if not rows:
        raise ValueError("rm: no comparisons to train on (every one was dropped by the length rule?)")
    dist.require_rows(cfg.batch_size, "the batch of prompts", "--rm.batch_size")
    tok, pad = ctx.tokenizer, ctx.tokenizer.pad_token_id
    model = placed(load_model(saved_model(ckpt, "reward")), ctx.device).train()
    unwrap(model).config.score_offset = 0.0
    rm = shard(SequenceScores(model))
    optim, state, start = train_one(stage_dir, "reward", model, cfg, "--rm.lr", tok, ckpt)

    def step_fn(step: int, gen: torch.Generator) -> dict:
        idx = torch.randint(0, len(rows), (cfg.batch_size,), generator=gen).tolist()
        mine = [idx[i] for i in dist.rows(len(idx))]  # this process's prompts of the global batch
        loss, acc = ranking_loss(*score_comparisons(rm, [rows[i] for i in mine], pad))
        pairs, all_pairs = [n_pairs(rows[i]) for i in mine], [n_pairs(rows[i]) for i in idx]
        # the loss is a mean over prompts that have a pair, the accuracy one over pairs
        loss = dist.part(loss, sum(p > 0 for p in pairs), sum(p > 0 for p in all_pairs))
        optim.zero_grad()
        dist.backward(loss)
        optim.step()
        shares = dist.all_sum({"loss": loss.item(), "accuracy": acc * sum(pairs) / max(sum(all_pairs), 1)})
        return {**shares, "lr": optim.current_lr}

    run_steps(stage="rm", seed=ctx.cfg.run.seed, start=start, total=cfg.steps, step_fn=step_fn, state=state,
              log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, progress=ctx.cfg.run.progress,
              lr=cfg.lr)

    if is_peft(model):
        rm = SequenceScores(plain(model))  # adapters merged
    result = {"rm_train_accuracy": pairwise_accuracy(rm, rows[:500], pad)}
    if demos is not None:
        # Normalise: the labelers' demonstrations score 0 on average (the paper's bias fix before PPO).
        offset = mean_score(rm, *demos, pad)
        rm.scalar.config.score_offset = offset
        result.update(score_offset=offset, demonstration_score_mean_after=mean_score(rm, *demos, pad))
    else:
        log.warning("rm: no demonstrations given (--data.demonstrations), so scores are not shifted to average "
                    "0 on them")
    if evaluate is not None:
        result.update(evaluate(rm))
    write_text_atomic(stage_dir / "eval.json", json.dumps(result, indent=2))
    log.info("rm: %s", result)
    save_models(stage_dir / "final", {"reward": rm.scalar}, tok)
    return final
