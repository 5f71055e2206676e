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
    rows: {prompt, responses, ranks} of token ids (ranks: 0 = best). An ensemble's scores are combined."""
    return per_prompt(rm(comparison_batch(rows, pad_id, next(rm.parameters()).device)), rows)


def in_bag(n_rows: int, members: int, seed: int) -> torch.Tensor:
    """[members, n_rows] bool: the comparisons each member trains on. One member: all of them. Several: each
    its own bootstrap resample (n_rows draws with replacement; about 63% of the rows, each counted once), so
    the members differ by data as well as by their heads' initialisation."""
    if members == 1:
        return torch.ones(1, n_rows, dtype=torch.bool)
    bags = torch.zeros(members, n_rows, dtype=torch.bool)
    for m in range(members):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + m)
        bags[m, torch.randint(0, n_rows, (n_rows,), generator=gen)] = True
    return bags


def ensemble_ranking_loss(rm: SequenceScores, rows: list[dict], bag: torch.Tensor, pad_id: int):
    """The ranking loss of each member on its own rows of the batch -> (losses [M], pair accuracies [M],
    prompts with a pair per member [M]). rows: the batch's comparisons; bag: [M, len(rows)] which member
    trains on which row."""
    flat = rm(comparison_batch(rows, pad_id, next(rm.parameters()).device), members=True)  # [M, sum K]
    losses, accs, counted = [], [], []
    for m in range(flat.shape[0]):
        values, ranks, valid = per_prompt(flat[m], rows)
        valid = valid & bag[m].to(valid.device)[:, None]
        loss, acc = ranking_loss(values, ranks, valid)
        losses.append(loss)
        accs.append(acc)
        counted.append(sum(n_pairs(r) > 0 and bool(b) for r, b in zip(rows, bag[m])))
    return torch.stack(losses), accs, counted


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
def mean_score(rm: SequenceScores, prompts, responses, pad_id: int, chunk: int = 256) -> list[float]:
    """Each member's mean score of the sequences (one value for a single reward model)."""
    was = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    vals = [rm(make_batch(prompts[i:i + chunk], responses[i:i + chunk], pad_id).to(device), members=True)
            for i in range(0, len(prompts), chunk)]
    rm.train(was)
    return torch.cat(vals, dim=1).mean(dim=1).tolist()


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
    members = unwrap(model).score.out_features
    unwrap(model).config.score_offset = 0.0 if members == 1 else [0.0] * members
    rm = shard(SequenceScores(model))
    optim, state, start = train_one(stage_dir, "reward", model, cfg, "--rm.lr", tok, ckpt)
    bag = in_bag(len(rows), members, ctx.cfg.run.seed)

    def step_fn(step: int, gen: torch.Generator) -> dict:
        idx = torch.randint(0, len(rows), (cfg.batch_size,), generator=gen).tolist()
        mine = [idx[i] for i in dist.rows(len(idx))]  # this process's prompts of the global batch
        losses, accs, counted = ensemble_ranking_loss(rm, [rows[i] for i in mine], bag[:, mine], pad)
        pairs, all_pairs = [n_pairs(rows[i]) for i in mine], [n_pairs(rows[i]) for i in idx]
        # each member's loss is a mean over its prompts that have a pair, the accuracy one over pairs; the
        # members' losses are summed over members (each head's gradient is its own loss's)
        everyone = [sum(n_pairs(rows[i]) > 0 and bool(bag[m, i]) for i in idx) for m in range(members)]
        loss = sum(dist.part(losses[m], counted[m], everyone[m]) for m in range(members))
        optim.zero_grad()
        dist.backward(loss)
        optim.step()
        acc = sum(accs) / members  # one member: its accuracy (several: their mean, in-bag pairs of the batch)
        shares = dist.all_sum({"loss": loss.item() / members, "accuracy": acc * sum(pairs) / max(sum(all_pairs), 1)})
        return {**shares, "lr": optim.current_lr}

    run_steps(stage="rm", seed=ctx.cfg.run.seed, start=start, total=cfg.steps, step_fn=step_fn, state=state,
              log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, progress=ctx.cfg.run.progress,
              lr=cfg.lr)

    if is_peft(model):
        rm = SequenceScores(plain(model))  # adapters merged
    result = {"rm_train_accuracy": pairwise_accuracy(rm, rows[:500], pad)}
    if demos is not None:
        # Normalise: the labelers' demonstrations score 0 on average (the paper's bias fix before PPO), each
        # member on its own
        offset = mean_score(rm, *demos, pad)
        rm.scalar.config.score_offset = offset[0] if members == 1 else offset
        after = mean_score(rm, *demos, pad)
        result.update(score_offset=rm.scalar.config.score_offset,
                      demonstration_score_mean_after=after[0] if members == 1 else max(after, key=abs))
    else:
        log.warning("rm: no demonstrations given (--data.demonstrations), so scores are not shifted to average "
                    "0 on them")
    if evaluate is not None:
        result.update(evaluate(rm))
    write_text_atomic(stage_dir / "eval.json", json.dumps(result, indent=2))
    log.info("rm: %s", result)
    save_models(stage_dir / "final", {"reward": rm.scalar}, tok)
    return final
