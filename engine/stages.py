"""The InstructGPT stages as functions of a RunContext; the CLI and the pipeline only call these."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .models import build_policy, load_policy
from .task import encode_prompt, encode_response, encode_text
from .trainers.lm import train_lm
from .trainers.ppo import train_ppo
from .trainers.reward import train_reward

log = logging.getLogger("engine")


def pretrain(ctx) -> Path:
    examples = [encode_text(ctx.tokenizer, t) for t in ctx.data.corpus]
    return train_lm(ctx, "pretrain", examples, build_policy(ctx.cfg.model, ctx.tokenizer), ctx.cfg.pretrain)


def sft(ctx) -> Path:
    tok = ctx.tokenizer
    examples = [(encode_prompt(tok, d["prompt"]), encode_response(tok, d["response"])) for d in ctx.data.demonstrations]
    init = load_policy(ctx.final("pretrain", "policy"), ctx.device)
    return train_lm(ctx, "sft", examples, init, ctx.cfg.sft)


def rm(ctx) -> Path:
    return train_reward(ctx, ctx.final("sft", "policy"), ctx.cfg.rm)


def ppo(ctx, ptx: bool = False) -> Path:
    return train_ppo(ctx, ctx.final("sft", "policy"), ctx.final("rm", "reward"), ptx=ptx)


def evaluate(ctx) -> dict:
    from .report import build_report

    report = build_report(ctx)
    log.info("report: %s", json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}))
    return report


def pipeline(ctx) -> dict:
    """pretrain -> sft -> rm -> ppo -> ppo-ptx -> eval. With --run.resume, finished stages are skipped."""
    pretrain(ctx)
    sft(ctx)
    rm(ctx)
    ppo(ctx, ptx=False)
    ppo(ctx, ptx=True)
    return evaluate(ctx)
