"""PPO against the reward model (InstructGPT section 3.5), and PPO-ptx.

Each iteration: sample prompts; generate one answer each with the current policy; score with the RM;
per-token log-probs of the policy (old), the SFT reference, and values; shaped rewards
(`kernels.shape_rewards`: RM score at the last token minus beta * KL to the SFT model); advantages
(`kernels.gae`), whitened; then several epochs of minibatches with the clipped policy and value losses,
plus gamma times the pretraining LM loss for PPO-ptx. The value model starts as the RM.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import kernels
from kernels import masked_mean, policy_loss, value_loss

from ..batch import SequenceBatch, make_batch
from ..checkpoint import is_done, latest_checkpoint, load_trainer_state, save_checkpoint, save_models
from ..evaluate import sample_answers, win_rate
from ..kl_control import adaptive_kl_coef
from ..lora import is_peft, merged_named_weights, plain
from ..models import load_policy, load_scalar_model, response_logprobs, sequence_scores, token_values
from ..rollout import make_rollout
from ..task import encode_prompt, encode_text
from .lm import lm_loss
from .loop import adamw, restore_optimizer, run_steps, step_seed

log = logging.getLogger("engine")


@dataclass
class Experience:
    """One iteration's rollouts; every [B, R] tensor is aligned with batch.response_mask."""
    batch: SequenceBatch
    old_logprobs: torch.Tensor   # [B, R] policy at sampling time
    ref_logprobs: torch.Tensor   # [B, R] SFT reference
    old_values: torch.Tensor     # [B, R]
    scores: torch.Tensor         # [B] RM score of each whole answer
    rewards: torch.Tensor        # [B, R] shaped
    kl: torch.Tensor             # [B, R] per-token KL estimate
    advantages: torch.Tensor     # [B, R]
    returns: torch.Tensor        # [B, R]
    engine_logprobs: torch.Tensor | None = None  # [B, R] what the rollout engine reported when sampling


@torch.no_grad()
def make_experience(policy, ref, value, reward, batch: SequenceBatch, *, kl_coef, cfg, temperature, fused=True):
    """Score one batch of rollouts and compute rewards and advantages. cfg: PPOConfig.

    ref: the frozen SFT policy, or None for the policy with its LoRA adapters disabled (one base in memory).
    reward: the reward model, or a function batch -> scores [B] (e.g. one that re-tokenizes for an RM with
    its own tokenizer).
    """
    for m in (policy, value):
        m.eval()
    mask = batch.response_mask
    old_lp = response_logprobs(policy, batch, temperature=temperature, backend=cfg.backend, fused=fused)
    if ref is None:
        with policy.disable_adapter():
            ref_lp = response_logprobs(policy, batch, temperature=temperature, backend=cfg.backend, fused=fused)
    else:
        ref_lp = response_logprobs(ref, batch, temperature=temperature, backend=cfg.backend, fused=fused)
    values = token_values(value, batch) * mask
    scores = sequence_scores(reward, batch) if isinstance(reward, torch.nn.Module) else reward(batch)
    rewards, kl = kernels.shape_rewards(scores, old_lp, ref_lp, mask, kl_coef=kl_coef,
                                        estimator=cfg.kl_estimator, backend=cfg.backend)
    adv, ret = kernels.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam, backend=cfg.backend,
                           whiten=cfg.whiten_advantages)
    for m in (policy, value):
        m.train()
    return Experience(batch, old_lp, ref_lp, values, scores, rewards, kl, adv, ret)


def ppo_minibatch_loss(policy, value, exp: Experience, idx, cfg, temperature, ptx=None, fused=True):
    """Loss of one minibatch: clipped policy loss + vf_coef * clipped value loss (+ ptx_coef * LM loss)."""
    mb = exp.batch.select(idx)
    mask = mb.response_mask
    lp, ent = response_logprobs(policy, mb, temperature=temperature, return_entropy=True, backend=cfg.backend,
                                fused=fused)
    is_weights = None
    if cfg.tis_cap > 0 and exp.engine_logprobs is not None:
        # Truncated importance sampling: the samples came from the engine's distribution, not the
        # trainer's; reweight by min(pi_trainer / pi_engine, cap) (as TRL, OpenRLHF and verl do).
        is_weights = torch.exp(exp.old_logprobs[idx] - exp.engine_logprobs[idx]).clamp(max=cfg.tis_cap) * mask
    pg, pg_stats = policy_loss(lp, exp.old_logprobs[idx], exp.advantages[idx], mask, cfg.clip_eps,
                               is_weights=is_weights)
    v = token_values(value, mb)
    vf, vf_stats = value_loss(v, exp.old_values[idx], exp.returns[idx], mask, cfg.value_clip_eps)
    loss = pg + cfg.vf_coef * vf
    stats = {"pg_loss": pg.item(), "vf_loss": vf.item(), "entropy": masked_mean(ent, mask).item(),
             **pg_stats, **vf_stats}
    if ptx is not None:
        ptx_loss = ptx()
        loss = loss + cfg.ptx_coef * ptx_loss
        stats["ptx_loss"] = ptx_loss.item()
    return loss, stats


def engine_logprobs(results, like: torch.Tensor) -> torch.Tensor:
    """The rollout engine's log-probs of the sampled tokens as a [B, R] tensor shaped like `like`."""
    eng = torch.zeros_like(like)
    for i, r in enumerate(results):
        lps = r.logprobs[: like.shape[1]]
        eng[i, :len(lps)] = torch.tensor(lps, dtype=like.dtype)
    return eng


def _engine_mismatch(eng, old_lp, mask) -> dict:
    """|logp_engine - logp_trainer| over sampled tokens, and the share of ratios outside [0.9, 1.1]."""
    diff = (eng - old_lp).abs()[mask]
    ratio = torch.exp(old_lp - eng)[mask]
    return {"logprob_diff_mean": diff.mean().item(), "logprob_diff_max": diff.max().item(),
            "ratio_outside_0.9_1.1": ((ratio < 0.9) | (ratio > 1.1)).float().mean().item()}


@dataclass
class PPOSetup:
    """What a PPO run trains and on what, built by a stage (the built-in task's or the user's checkpoints).

    load_policy/load_value(resume): the model, from a checkpoint's model directory (full weights or LoRA
    adapters) or, with None, from where PPO starts (the SFT policy; the RM for the value model).
    """
    load_policy: Callable
    load_value: Callable
    reference: torch.nn.Module | None      # frozen SFT policy; None: the policy with its adapters disabled
    score: Callable                        # score(batch, prompt indices, results) -> RM scores [B]
    policy_dir: Path                       # the starting weights (a vLLM engine loads them)
    prompts: list[list[int]]               # prompt token ids
    ptx_examples: list | None = None       # (prompt ids, response ids) of pretraining text, for PPO-ptx
    max_model_len: int = 64                # prompt + response tokens
    evaluate: Callable | None = None       # evaluate(policy) -> win rate against the SFT policy
    engine_dtype: str | None = None        # the rollout engine's weights; None: the policy's


def train_ppo(ctx, setup: PPOSetup, *, ptx: bool) -> Path:
    """Run PPO (or PPO-ptx) from the SFT policy and the RM; returns the final policy directory."""
    cfg, rcfg, run = ctx.cfg.ppo, ctx.cfg.rollout, ctx.cfg.run
    stage = "ppo_ptx" if ptx else "ppo"
    stage_dir = ctx.fresh_stage_dir(stage)
    final = stage_dir / "final" / "policy"
    if is_done(stage_dir):
        return final
    if ptx and not setup.ptx_examples:
        raise ValueError("ppo --ptx true needs pretraining text: give --data.pretrain FILE ({\"text\": ...} "
                         "records)")
    if not setup.prompts:
        raise ValueError("ppo: no prompts (every one was dropped by the length rule?)")
    tok, pad, dev = ctx.tokenizer, ctx.tokenizer.pad_token_id, ctx.device
    ckpt = latest_checkpoint(stage_dir) if run.resume else None
    policy = setup.load_policy(ckpt / "policy" if ckpt else None).train()
    value = setup.load_value(ckpt / "value" if ckpt else None).train()
    ref = setup.reference
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731 - LoRA trains a few
    opt_p, opt_v = adamw(trainable(policy), cfg.lr), adamw(trainable(value), cfg.value_lr)
    kl_coef, start = cfg.kl_coef, 0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        restore_optimizer(opt_p, state["opt_policy"], cfg.lr, "--ppo.lr")
        restore_optimizer(opt_v, state["opt_value"], cfg.value_lr, "--ppo.value_lr")
        kl_coef, start = state["kl_coef"], state["step"]
        if not cfg.adaptive_kl and kl_coef != cfg.kl_coef:  # a fixed beta changed between runs is honoured
            log.warning("resuming with --ppo.kl_coef %g (the checkpoint was trained with %g)", cfg.kl_coef, kl_coef)
            kl_coef = cfg.kl_coef
    gpu = dict(gpu_memory_utilization=rcfg.gpu_memory_utilization, enable_sleep_mode=rcfg.sleep) \
        if dev.type == "cuda" else {}
    rollout = make_rollout(rcfg.backend, policy=policy, model_dir=setup.policy_dir, seed=run.seed, pad_token_id=pad,
                           eos_token_id=tok.eos_token_id,
                           dtype=setup.engine_dtype or str(next(policy.parameters()).dtype).split(".")[-1],
                           max_model_len=setup.max_model_len, **gpu)
    sleeps = bool(gpu.get("enable_sleep_mode")) and hasattr(rollout, "sleep")

    def sync():  # the HF backend samples from the policy object itself; an engine gets the merged weights
        if getattr(rollout, "model", None) is not policy:
            rollout.update_weights(merged_named_weights(policy))

    if ckpt is not None or is_peft(policy):
        sync()  # the engine started from the SFT weights
    prompts, corpus = setup.prompts, setup.ptx_examples
    sft_win = setup.evaluate if cfg.eval_every else None

    def ptx_loss(gen):
        idx = torch.randint(0, len(corpus), (cfg.ptx_batch,), generator=gen).tolist()
        return lm_loss(policy, [corpus[i][0] for i in idx], [corpus[i][1] for i in idx], pad, cfg.backend,
                       fused=run.fused_lm_head)

    def step_fn(step: int, gen: torch.Generator) -> dict:
        nonlocal kl_coef
        idx = torch.randint(0, len(prompts), (cfg.rollout_batch,), generator=gen).tolist()
        batch_prompts = [prompts[i] for i in idx]
        results = rollout.generate(batch_prompts, max_tokens=rcfg.max_new_tokens, temperature=rcfg.temperature,
                                   top_p=rcfg.top_p, top_k=rcfg.top_k, seed=step_seed(run.seed, stage, step) + 2)
        if sleeps:  # free the engine's GPU memory for the trainer's passes
            rollout.sleep(level=1)
        batch = make_batch(batch_prompts, [r.token_ids for r in results], pad).to(dev)
        exp = make_experience(policy, ref, value, lambda b: setup.score(b, idx, results), batch, kl_coef=kl_coef,
                              cfg=cfg, temperature=rcfg.temperature, fused=run.fused_lm_head)
        exp.engine_logprobs = engine_logprobs(results, exp.old_logprobs)
        stats: dict[str, list] = {}
        for _ in range(cfg.epochs):
            perm = torch.randperm(cfg.rollout_batch, generator=gen)
            for mb in perm.split(cfg.minibatch):
                loss, s = ppo_minibatch_loss(policy, value, exp, mb, cfg, rcfg.temperature,
                                             (lambda: ptx_loss(gen)) if ptx else None, fused=run.fused_lm_head)
                opt_p.zero_grad(set_to_none=True)
                opt_v.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable(policy), cfg.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(trainable(value), cfg.max_grad_norm)
                opt_p.step()
                opt_v.step()
                s["loss"] = loss.item()
                for k, v in s.items():
                    stats.setdefault(k, []).append(v)
        if sleeps:
            rollout.wake_up()
        sync()
        mask = exp.batch.response_mask
        seq_kl = (exp.kl * mask).sum(1).mean().item()
        m = {k: sum(v) / len(v) for k, v in stats.items()}
        m.update(score=exp.scores.mean().item(), kl=seq_kl, kl_coef=kl_coef,
                 reward=(exp.rewards * mask).sum(1).mean().item(), response_len=mask.sum(1).float().mean().item(),
                 finished=sum(r.finish_reason == "stop" for r in results) / len(results),
                 **_engine_mismatch(exp.engine_logprobs, exp.old_logprobs, mask))
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, seq_kl, cfg.target_kl, cfg.rollout_batch, cfg.kl_horizon)
        if sft_win is not None and ((step + 1) % cfg.eval_every == 0 or step == 0):
            m["win_rate_vs_sft"] = sft_win(policy)
        return m

    def save_fn(step: int) -> Path:
        return save_checkpoint(stage_dir, step, {"policy": policy, "value": value}, {
            "opt_policy": opt_p.state_dict(), "opt_value": opt_v.state_dict(),
            "kl_coef": kl_coef}, tok)

    run_steps(stage=stage, stage_dir=stage_dir, seed=ctx.cfg.run.seed, start=start, total=cfg.iterations, step_fn=step_fn,
              save_fn=save_fn, models={"policy": policy, "value": value}, log_every=1,
              checkpoint_every=cfg.checkpoint_every, progress=run.progress, lr=cfg.lr)
    rollout.close()
    save_models(stage_dir / "final", {"policy": plain(policy), "value": plain(value)}, tok)
    (stage_dir / "summary.json").write_text(json.dumps({"ptx": ptx, "kl_coef_final": kl_coef}, indent=2))
    return final


def builtin_ppo(ctx, sft_dir: Path, rm_dir: Path, *, ptx: bool) -> Path:
    """PPO on the built-in task: its PPO prompts, its corpus for PPO-ptx, its held-out labelers judging."""
    tok, dev, cfg = ctx.tokenizer, ctx.device, ctx.cfg.ppo
    reward = load_scalar_model(rm_dir, dev).eval().requires_grad_(False)
    ref = load_policy(sft_dir, dev).eval().requires_grad_(False)
    eval_insts = ctx.data.eval_prompts[: cfg.eval_prompts]
    eval_kw = dict(temperature=ctx.cfg.eval.temperature, max_tokens=ctx.cfg.rollout.max_new_tokens,
                   seed=ctx.cfg.eval.seed)
    sft_answers = sample_answers(ref, tok, eval_insts, **eval_kw) if cfg.eval_every else None

    def evaluate(policy) -> float:
        ans = sample_answers(policy, tok, eval_insts, **eval_kw)
        return win_rate(eval_insts, ans, sft_answers, ctx.data.heldout_labelers, ctx.cfg.eval.seed)["win_rate"]

    setup = PPOSetup(
        load_policy=lambda resume: load_policy(resume or sft_dir, dev),
        load_value=lambda resume: load_scalar_model(resume or rm_dir, dev),  # the value model starts as the RM
        reference=ref,
        score=lambda batch, idx, results: sequence_scores(reward, batch),
        policy_dir=sft_dir,
        prompts=[encode_prompt(tok, p.prompt) for p in ctx.data.ppo_prompts],
        ptx_examples=[encode_text(tok, t) for t in ctx.data.corpus],
        max_model_len=ctx.cfg.model.max_positions,
        evaluate=evaluate,
    )
    return train_ppo(ctx, setup, ptx=ptx)
