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

from ..batch import make_batch
from ..checkpoint import is_done, latest_checkpoint, load_trainer_state, save_checkpoint, save_models, write_text_atomic
from ..lora import plain, unwrap
from ..models import load_scalar_model, sequence_scores
from ..task import encode_prompt, encode_response
from .loop import adamw, restore_optimizer, run_steps, warmup_cosine

log = logging.getLogger("engine")


def encode_comparison(tokenizer, row: dict) -> dict:
    return {
        "prompt": encode_prompt(tokenizer, row["prompt"]),
        "responses": [encode_response(tokenizer, r, f) for r, f in zip(row["responses"], row["finished"])],
        "ranks": row["ranks"],
    }


def score_comparisons(model, rows: list[dict], pad_id: int):
    """Score every response of every prompt at once -> (scores [B, Kmax], ranks [B, Kmax], valid [B, Kmax])."""
    kmax = max(len(r["responses"]) for r in rows)
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    responses = [resp for r in rows for resp in r["responses"]]
    device = next(model.parameters()).device
    flat = sequence_scores(model, make_batch(prompts, responses, pad_id).to(device))
    scores = torch.zeros(len(rows), kmax, device=device)
    ranks = torch.full((len(rows), kmax), kmax, dtype=torch.long, device=device)
    valid = torch.zeros(len(rows), kmax, dtype=torch.bool, device=device)
    i = 0
    for b, r in enumerate(rows):
        k = len(r["responses"])
        scores[b, :k] = flat[i:i + k]
        ranks[b, :k] = torch.tensor(r["ranks"])
        valid[b, :k] = True
        i += k
    return scores, ranks, valid


@torch.no_grad()
def pairwise_accuracy(model, rows: list[dict], pad_id: int, rank_key: str = "ranks", chunk: int = 64) -> float:
    """Fraction of ranked pairs the model orders like the labeler did."""
    model.eval()
    right = total = 0.0
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        scores, ranks, valid = score_comparisons(model, [{**r, "ranks": r[rank_key]} for r in part], pad_id)
        better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        right += ((scores[:, :, None] > scores[:, None, :]) & better).sum().item()
        total += better.sum().item()
    model.train()
    return right / max(total, 1)


@torch.no_grad()
def mean_score(model, prompts, responses, pad_id: int, chunk: int = 256) -> float:
    model.eval()
    device = next(model.parameters()).device
    vals = [sequence_scores(model, make_batch(prompts[i:i + chunk], responses[i:i + chunk], pad_id).to(device))
            for i in range(0, len(prompts), chunk)]
    model.train()
    return torch.cat(vals).mean().item()


def train_reward(ctx, load_model, cfg, rows: list[dict], demos: tuple[list, list] | None, evaluate=None) -> Path:
    """Train the RM on ranked `rows` ({prompt, responses, ranks}: token ids, ranks 0 = best); returns the
    final RM directory. cfg: RewardConfig.

    load_model(resume): the model, from a checkpoint's model directory or (None) from the SFT model.
    demos: (prompt ids, response ids) lists of the labelers' demonstrations: the scores are shifted so they
    average 0 (None: no shift). evaluate(model) -> dict: extra metrics written to eval.json.
    """
    stage = "rm"
    stage_dir = ctx.fresh_stage_dir(stage)
    final = stage_dir / "final" / "reward"
    if is_done(stage_dir):
        return final
    if not rows:
        raise ValueError("rm: no comparisons to train on (every one was dropped by the length rule?)")
    tok, pad = ctx.tokenizer, ctx.tokenizer.pad_token_id
    ckpt = latest_checkpoint(stage_dir) if ctx.cfg.run.resume else None
    model = load_model(ckpt / "reward" if ckpt else None).train()
    unwrap(model).config.score_offset = 0.0
    opt = adamw([p for p in model.parameters() if p.requires_grad], cfg.lr)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    start = 0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        restore_optimizer(opt, state["optimizer"], cfg.lr, "--rm.lr", sched, state["scheduler"])
        start = state["step"]

    def step_fn(step: int, gen: torch.Generator) -> dict:
        idx = torch.randint(0, len(rows), (cfg.batch_size,), generator=gen).tolist()
        scores, ranks, valid = score_comparisons(model, [rows[i] for i in idx], pad)
        loss, acc = ranking_loss(scores, ranks, valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return {"loss": loss.item(), "accuracy": acc, "lr": sched.get_last_lr()[0]}

    def save_fn(step: int) -> Path:
        return save_checkpoint(stage_dir, step, {"reward": model}, {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tok)

    run_steps(stage=stage, stage_dir=stage_dir, seed=ctx.cfg.run.seed, start=start, total=cfg.steps, step_fn=step_fn,
              save_fn=save_fn, models={"reward": model}, log_every=cfg.log_every,
              checkpoint_every=cfg.checkpoint_every, progress=ctx.cfg.run.progress, lr=cfg.lr)

    model = plain(model)
    result = {"rm_train_accuracy": pairwise_accuracy(model, rows[:500], pad)}
    if demos is not None:
        # Normalise: the labelers' demonstrations score 0 on average (the paper's bias fix before PPO).
        offset = mean_score(model, *demos, pad)
        model.config.score_offset = offset
        result.update(score_offset=offset, demonstration_score_mean_after=mean_score(model, *demos, pad))
    else:
        log.warning("rm: no demonstrations given (--data.demonstrations), so scores are not shifted to average "
                    "0 on them")
    if evaluate is not None:
        result.update(evaluate(model))
    write_text_atomic(stage_dir / "eval.json", json.dumps(result, indent=2))
    log.info("rm: %s", result)
    save_models(stage_dir / "final", {"reward": model}, tok)
    return final


def builtin_reward(ctx, init_dir: Path, cfg) -> Path:
    """The built-in task's RM: its rankings, its demonstrations, and held-out labelers' rankings to test on."""
    tok, pad = ctx.tokenizer, ctx.tokenizer.pad_token_id
    rows = [encode_comparison(tok, r) for r in ctx.data.comparisons]
    demos = ([encode_prompt(tok, d["prompt"]) for d in ctx.data.demonstrations],
             [encode_response(tok, d["response"]) for d in ctx.data.demonstrations])
    heldout = [{**encode_comparison(tok, r), "ranks_second": r["ranks_second"]} for r in ctx.data.comparisons_heldout]

    def evaluate(model) -> dict:
        return {"rm_heldout_accuracy": pairwise_accuracy(model, heldout, pad),
                "rm_heldout_accuracy_second_labeler": pairwise_accuracy(model, heldout, pad, "ranks_second"),
                "labeler_agreement": ctx.data.labeler_agreement()}

    def load(resume):
        return load_scalar_model(resume or init_dir, ctx.device)

    return train_reward(ctx, load, cfg, rows, demos, evaluate)
