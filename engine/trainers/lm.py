"""Language-model training: `pretrain` (the corpus) and `sft` (demonstrations, loss on the response only)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from kernels import masked_mean

from ..batch import make_batch
from ..checkpoint import is_done, latest_checkpoint, load_trainer_state, save_checkpoint, save_models
from ..lora import plain
from ..models import response_logprobs
from .loop import adamw, restore_optimizer, run_steps, warmup_cosine

log = logging.getLogger("engine")


def lm_loss(model, prompts, responses, pad_id: int, backend: str = "auto", fused: bool = True) -> torch.Tensor:
    """Mean negative log-likelihood per response token (nats)."""
    batch = make_batch(prompts, responses, pad_id).to(next(model.parameters()).device)
    lp = response_logprobs(model, batch, backend=backend, fused=fused)
    return -masked_mean(lp, batch.response_mask)


def train_lm(ctx, stage: str, examples: list[tuple[list[int], list[int]]], load_model, cfg) -> Path:
    """Train a causal LM on (prompt ids, response ids) pairs; returns the directory of the final model.

    load_model(resume): the model to train, from a checkpoint's model directory `resume` (full weights or
    LoRA adapters) or, with resume=None, from where the stage starts. cfg: engine.config.LMTrainConfig.
    With --run.resume a finished stage is skipped and an unfinished one continues from its latest
    checkpoint (weights, optimizer, schedule, data order and RNG).
    """
    stage_dir = ctx.fresh_stage_dir(stage)
    final = stage_dir / "final" / "policy"
    if is_done(stage_dir):
        log.info("%s: already done (%s)", stage, final)
        return final
    if not examples:
        raise ValueError(f"{stage}: no training examples (every one was dropped by the length rule?)")
    pad = ctx.tokenizer.pad_token_id
    start, state = 0, None
    ckpt = latest_checkpoint(stage_dir) if ctx.cfg.run.resume else None
    model = load_model(ckpt / "policy" if ckpt is not None else None)
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        start = state["step"]
        log.info("%s: resuming from %s", stage, ckpt)
    model.to(ctx.device).train()
    opt = adamw([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    if state is not None:
        restore_optimizer(opt, state["optimizer"], cfg.lr, f"--{stage}.lr", sched, state["scheduler"])

    def step_fn(step: int, gen: torch.Generator) -> dict:
        idx = torch.randint(0, len(examples), (cfg.batch_size,), generator=gen).tolist()
        loss = lm_loss(model, [examples[i][0] for i in idx], [examples[i][1] for i in idx], pad,
                       fused=ctx.cfg.run.fused_lm_head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return {"loss": loss.item(), "grad_norm": float(gnorm), "lr": sched.get_last_lr()[0]}

    def save_fn(step: int) -> Path:
        return save_checkpoint(stage_dir, step, {"policy": model}, {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
            ctx.tokenizer)

    run_steps(stage=stage, stage_dir=stage_dir, seed=ctx.cfg.run.seed, start=start, total=cfg.steps, step_fn=step_fn,
              save_fn=save_fn, models={"policy": model}, log_every=cfg.log_every,
              checkpoint_every=cfg.checkpoint_every, progress=ctx.cfg.run.progress, lr=cfg.lr)
    save_models(stage_dir / "final", {"policy": plain(model)}, ctx.tokenizer)
    return final
