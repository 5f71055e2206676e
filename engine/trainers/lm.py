"""Language-model training: pretraining text and SFT on demonstrations (loss on the response only)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from kernels import masked_mean

from ..models.batch import make_batch
from ..models.forward import PolicyLogprobs
from ..models.loading import placed
from ..models.lora import plain
from ..models.sharding import shard
from ..parallel import distributed as dist
from ..rundir.final import save_models
from .loop import run_steps
from .state import open_stage, saved_model, train_one

log = logging.getLogger("engine")


def lm_loss(policy: PolicyLogprobs, prompts, responses, pad_id: int) -> torch.Tensor:
    """Mean negative log-likelihood per response token (nats). prompts/responses: token id lists."""
    batch = make_batch(prompts, responses, pad_id).to(next(policy.parameters()).device)
    return -masked_mean(policy(batch), batch.response_mask)


def lm_loss_part(policy: PolicyLogprobs, examples, idx: list[int], pad_id: int) -> torch.Tensor:
    """This process's part of the LM loss of the global batch examples[idx] ((prompt ids, response ids)
    pairs): its rows' loss weighted by their share of the batch's response tokens (engine.parallel.distributed.part);
    the whole loss in one process."""
    mine = [idx[i] for i in dist.rows(len(idx))]
    loss = lm_loss(policy, [examples[i][0] for i in mine], [examples[i][1] for i in mine], pad_id)
    return dist.part(loss, sum(len(examples[i][1]) for i in mine), sum(len(examples[i][1]) for i in idx))


def padded_tokens(rows: list[tuple[list[int], list[int]]]) -> int:
    """This rank's padded [rows, prompt + response] tokens of its share of `rows`: what a training pass holds
    activations for (`python -m engine plan` calls it the micro-batch)."""
    mine = [rows[i] for i in dist.rows(len(rows))]
    return len(mine) * (max(len(p) for p, _ in mine) + max(1, max(len(r) for _, r in mine)))


def train_lm(ctx, stage: str, examples: list[tuple[list[int], list[int]]], load_model, cfg) -> Path:
    """Train a causal LM on (prompt ids, response ids) pairs; returns the directory of the final model.

    load_model(resume): the model to train, from a checkpoint's model directory `resume` (full weights or LoRA
    adapters) or, with resume=None, from where the stage starts. cfg: engine.config.LMTrainConfig.
    With --run.resume a finished stage is skipped and an unfinished one continues from its latest checkpoint
    (weights, optimizer, schedule, data order and RNG).
    """
    stage_dir, final, ckpt = open_stage(ctx, stage, "policy")
    dist.require_rows(cfg.batch_size, "the batch", f"--{stage}.batch_size")
    if final.is_dir():
        log.info("%s: already done (%s)", stage, final)
        return final
    if not examples:
        raise ValueError(f"{stage}: no training examples (every one was dropped by the length rule?)")
    pad = ctx.tokenizer.pad_token_id
    model = placed(load_model(saved_model(ckpt, "policy")), ctx.device).train()
    policy = shard(PolicyLogprobs(model, fused=ctx.cfg.run.fused_lm_head))
    optim, state, start = train_one(stage_dir, "policy", model, cfg, f"--{stage}.lr", ctx.tokenizer, ckpt)

    def step_fn(step: int, gen: torch.Generator) -> dict:
        idx = torch.randint(0, len(examples), (cfg.batch_size,), generator=gen).tolist()
        loss = lm_loss_part(policy, examples, idx, pad)
        optim.zero_grad()
        dist.backward(loss)
        grad_norm = optim.step()
        return {**dist.all_sum({"loss": loss.item()}), "grad_norm": grad_norm, "lr": optim.current_lr,
                "padded_tokens_per_rank": padded_tokens([examples[i] for i in idx])}

    run_steps(stage=stage, seed=ctx.cfg.run.seed, start=start, total=cfg.steps, step_fn=step_fn, state=state,
              log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, progress=ctx.cfg.run.progress,
              lr=cfg.lr)
    save_models(stage_dir / "final", {"policy": plain(model)}, ctx.tokenizer)
    return final
