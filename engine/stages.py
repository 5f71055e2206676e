"""The InstructGPT stages as functions of a RunContext; the CLI and the pipeline only call these."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .models import build_policy, load_policy
from .task import encode_prompt, encode_response, encode_text
from .trainers.lm import train_lm
from .trainers.ppo import builtin_ppo
from .trainers.reward import builtin_reward

log = logging.getLogger("engine")


def pretrain(ctx) -> Path:
    examples = [encode_text(ctx.tokenizer, t) for t in ctx.data.corpus]
    def load(resume):
        return load_policy(resume, ctx.device) if resume else build_policy(ctx.cfg.model, ctx.tokenizer)
    return train_lm(ctx, "pretrain", examples, load, ctx.cfg.pretrain)


def sft(ctx) -> Path:
    tok = ctx.tokenizer
    examples = [(encode_prompt(tok, d["prompt"]), encode_response(tok, d["response"])) for d in ctx.data.demonstrations]
    init = ctx.final("pretrain", "policy")
    return train_lm(ctx, "sft", examples, lambda resume: load_policy(resume or init, ctx.device), ctx.cfg.sft)


def rm(ctx) -> Path:
    return builtin_reward(ctx, ctx.final("sft", "policy"), ctx.cfg.rm)


def ppo(ctx, ptx: bool = False) -> Path:
    return builtin_ppo(ctx, ctx.final("sft", "policy"), ctx.final("rm", "reward"), ptx=ptx)


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
