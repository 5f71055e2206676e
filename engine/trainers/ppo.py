"""PPO against the reward model (InstructGPT section 3.5), and PPO-ptx.

One iteration (`ppo_iteration`, read it top to bottom): sample prompts; generate one answer each with the
current policy; score them with the RM; per-token log-probs of the policy (old) and of the SFT reference,
and values; shaped rewards (`kernels.shape_rewards`: RM score at the last token minus beta * KL to the SFT
model); advantages (`kernels.gae`), whitened; several epochs of minibatches with the clipped policy and
value losses, plus gamma times the pretraining LM loss for PPO-ptx; the new weights into the rollout
engine; beta adapts (`KLController`). The value model starts as the RM.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import kernels
from kernels import masked_mean, policy_loss, value_loss

from ..batch import SequenceBatch, make_batch
from ..checkpoint import save_models
from ..kl_control import KLController
from ..lora import is_peft, merged_named_weights, plain
from ..models import PolicyLogprobs, TokenValues
from ..rollout import make_rollout
from .lm import lm_loss
from .loop import run_steps, step_seed
from .optim import Optim
from .phases import Phases, no_phases
from .state import TrainState, open_stage

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
def make_experience(policy: PolicyLogprobs, ref: PolicyLogprobs | None, value: TokenValues, score: Callable,
                    batch: SequenceBatch, *, kl_coef: float, cfg, temperature: float, phase=no_phases) -> Experience:
    """Score one batch of rollouts and compute rewards and advantages. cfg: PPOConfig.

    ref: the frozen SFT policy, or None for the policy with its LoRA adapters disabled (one base in memory).
    score(batch) -> RM scores [B] (a SequenceScores model, or a function that re-tokenizes for an RM with its
    own tokenizer). phase(name): a context timing each part (engine.trainers.phases.Phases).
    """
    was = policy.training, value.training
    policy.eval()
    value.eval()
    mask = batch.response_mask
    with phase("logprobs"):
        old_lp = policy(batch, temperature)
    with phase("ref_logprobs"):
        if ref is None:
            with policy.lm.disable_adapter():
                ref_lp = policy(batch, temperature)
        else:
            ref_lp = ref(batch, temperature)
    with phase("values"):
        values = value(batch) * mask
    with phase("score"):
        scores = score(batch)
    with phase("advantages"):
        rewards, kl = kernels.shape_rewards(scores, old_lp, ref_lp, mask, kl_coef=kl_coef,
                                            estimator=cfg.kl_estimator, backend=cfg.backend)
        adv, ret = kernels.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam, backend=cfg.backend,
                               whiten=cfg.whiten_advantages)
    policy.train(was[0])
    value.train(was[1])
    return Experience(batch, old_lp, ref_lp, values, scores, rewards, kl, adv, ret)


def ppo_minibatch_loss(policy: PolicyLogprobs, value: TokenValues, exp: Experience, idx, cfg, temperature: float,
                       ptx: Callable[[], torch.Tensor] | None = None):
    """Loss of one minibatch: clipped policy loss + vf_coef * clipped value loss (+ ptx_coef * LM loss)."""
    mb = exp.batch.select(idx)
    mask = mb.response_mask
    lp, ent = policy(mb, temperature, return_entropy=True)
    is_weights = None
    if cfg.tis_cap > 0 and exp.engine_logprobs is not None:
        # Truncated importance sampling: the samples came from the engine's distribution, not the
        # trainer's; reweight by min(pi_trainer / pi_engine, cap) (as TRL, OpenRLHF and verl do).
        is_weights = torch.exp(exp.old_logprobs[idx] - exp.engine_logprobs[idx]).clamp(max=cfg.tis_cap) * mask
    pg, pg_stats = policy_loss(lp, exp.old_logprobs[idx], exp.advantages[idx], mask, cfg.clip_eps,
                               is_weights=is_weights)
    vf, vf_stats = value_loss(value(mb), exp.old_values[idx], exp.returns[idx], mask, cfg.value_clip_eps)
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
    eng = torch.zeros(like.shape, dtype=like.dtype)
    for i, r in enumerate(results):
        lps = r.logprobs[: like.shape[1]]
        eng[i, :len(lps)] = torch.as_tensor(lps, dtype=like.dtype)
    return eng.to(like.device)


def engine_mismatch(eng, old_lp, mask) -> dict:
    """|logp_engine - logp_trainer| over sampled tokens, and the share of ratios outside [0.9, 1.1]."""
    diff = (eng - old_lp).abs()[mask]
    ratio = torch.exp(old_lp - eng)[mask]
    return {"logprob_diff_mean": diff.mean().item(), "logprob_diff_max": diff.max().item(),
            "ratio_outside_0.9_1.1": ((ratio < 0.9) | (ratio > 1.1)).float().mean().item()}


@dataclass
class PPOSetup:
    """What a PPO run trains and on what, built by the `ppo` stage (engine/stages.py).

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


@dataclass
class PPORun:
    """Everything an iteration uses, built once by train_ppo. cfg: PPOConfig; rollout_cfg: RolloutConfig."""
    stage: str
    seed: int
    cfg: object
    rollout_cfg: object
    setup: PPOSetup
    policy: PolicyLogprobs
    ref: PolicyLogprobs | None
    value: TokenValues
    optims: dict[str, Optim]               # "policy", "value"
    kl: KLController
    engine: object                         # the rollout backend (engine.rollout)
    pad_id: int
    device: torch.device
    ptx: bool
    phases: Phases
    engine_sleeps: bool = False            # vLLM colocated on a GPU frees its memory during the trainer's passes


def ppo_iteration(run: PPORun, step: int, gen: torch.Generator) -> dict:
    """One PPO iteration; returns its metrics."""
    cfg, rcfg, setup = run.cfg, run.rollout_cfg, run.setup
    phase = run.phases
    idx = torch.randint(0, len(setup.prompts), (cfg.rollout_batch,), generator=gen).tolist()
    prompts = [setup.prompts[i] for i in idx]
    with phase("generate"):
        results = run.engine.generate(prompts, max_tokens=rcfg.max_new_tokens, temperature=rcfg.temperature,
                                      top_p=rcfg.top_p, top_k=rcfg.top_k, seed=step_seed(run.seed, run.stage, step) + 2)
    with engine_asleep(run):
        batch = make_batch(prompts, [r.token_ids for r in results], run.pad_id).to(run.device)
        exp = make_experience(run.policy, run.ref, run.value, lambda b: setup.score(b, idx, results), batch,
                              kl_coef=run.kl.coef, cfg=cfg, temperature=rcfg.temperature, phase=phase)
        exp.engine_logprobs = engine_logprobs(results, exp.old_logprobs)
        with phase("update"):
            stats = ppo_update(run, exp, gen)
    with phase("sync"):
        sync_weights(run)
    metrics = iteration_metrics(exp, results, stats, run.kl.coef)
    run.kl.update(metrics["kl"], cfg.rollout_batch)
    if setup.evaluate is not None and ((step + 1) % cfg.eval_every == 0 or step == 0):
        with phase("evaluate"):
            metrics["win_rate_vs_sft"] = setup.evaluate(run.policy.lm)
    metrics.update(phase.pop())
    return metrics


def ppo_update(run: PPORun, exp: Experience, gen: torch.Generator) -> dict[str, list]:
    """cfg.epochs passes over the rollouts in minibatches; each minibatch one step of both optimizers."""
    cfg = run.cfg
    ptx = (lambda: ptx_loss(run, gen)) if run.ptx else None
    stats: dict[str, list] = {}
    for _ in range(cfg.epochs):
        for mb in torch.randperm(cfg.rollout_batch, generator=gen).split(cfg.minibatch):
            loss, s = ppo_minibatch_loss(run.policy, run.value, exp, mb, cfg, run.rollout_cfg.temperature, ptx)
            for optim in run.optims.values():
                optim.zero_grad()
            loss.backward()
            for optim in run.optims.values():
                optim.step()
            s["loss"] = loss.item()
            for k, v in s.items():
                stats.setdefault(k, []).append(v)
    return stats


def ptx_loss(run: PPORun, gen: torch.Generator) -> torch.Tensor:
    """PPO-ptx: the LM loss on a batch of pretraining text."""
    corpus = run.setup.ptx_examples
    idx = torch.randint(0, len(corpus), (run.cfg.ptx_batch,), generator=gen).tolist()
    return lm_loss(run.policy, [corpus[i][0] for i in idx], [corpus[i][1] for i in idx], run.pad_id)


@contextlib.contextmanager
def engine_asleep(run: PPORun):
    """vLLM colocated on a GPU with sleep mode: its weights and KV cache leave the GPU while the trainer runs."""
    if run.engine_sleeps:
        run.engine.sleep(level=1)
    try:
        yield
    finally:
        if run.engine_sleeps:
            run.engine.wake_up()


def sync_weights(run: PPORun) -> None:
    """The HF backend samples from the policy object itself; an engine gets the merged weights."""
    if getattr(run.engine, "model", None) is not run.policy.lm:
        run.engine.update_weights(merged_named_weights(run.policy.lm))


def iteration_metrics(exp: Experience, results, stats: dict[str, list], kl_coef: float) -> dict:
    mask = exp.batch.response_mask
    m = {k: sum(v) / len(v) for k, v in stats.items()}
    m.update(score=exp.scores.mean().item(), kl=(exp.kl * mask).sum(1).mean().item(), kl_coef=kl_coef,
             reward=(exp.rewards * mask).sum(1).mean().item(), response_len=mask.sum(1).float().mean().item(),
             finished=sum(r.finish_reason == "stop" for r in results) / len(results),
             **engine_mismatch(exp.engine_logprobs, exp.old_logprobs, mask))
    return m


def make_ppo_run(ctx, setup: PPOSetup, policy_model, value_model, *, ptx: bool) -> PPORun:
    """Everything an iteration needs around the two trained models: their optimizers, beta, the reference and
    reward wrappers, and the rollout engine (started from setup.policy_dir). The benchmark of one iteration
    (bench/bench_ppo.py) builds its run here too."""
    cfg, rcfg, run_cfg = ctx.cfg.ppo, ctx.cfg.rollout, ctx.cfg.run
    tok, dev = ctx.tokenizer, ctx.device
    heads = dict(backend=cfg.backend, fused=run_cfg.fused_lm_head)
    optim = dict(weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    optims = {"policy": Optim.adamw(policy_model, lr=cfg.lr, flag="--ppo.lr", **optim),
              "value": Optim.adamw(value_model, lr=cfg.value_lr, flag="--ppo.value_lr", **optim)}
    gpu = dict(gpu_memory_utilization=rcfg.gpu_memory_utilization, enable_sleep_mode=rcfg.sleep) \
        if dev.type == "cuda" else {}
    engine = make_rollout(rcfg.backend, policy=policy_model, model_dir=setup.policy_dir, seed=run_cfg.seed,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          dtype=setup.engine_dtype or str(next(policy_model.parameters()).dtype).split(".")[-1],
                          max_model_len=setup.max_model_len, **gpu)
    return PPORun("ppo_ptx" if ptx else "ppo", run_cfg.seed, cfg, rcfg, setup, PolicyLogprobs(policy_model, **heads),
                  PolicyLogprobs(setup.reference, **heads) if setup.reference is not None else None,
                  TokenValues(value_model), optims, KLController.from_config(cfg), engine, tok.pad_token_id, dev, ptx,
                  Phases(dev), engine_sleeps=bool(gpu.get("enable_sleep_mode")) and hasattr(engine, "sleep"))


def train_ppo(ctx, setup: PPOSetup, *, ptx: bool) -> Path:
    """Run PPO (or PPO-ptx) from the SFT policy and the RM; returns the final policy directory."""
    cfg, run_cfg = ctx.cfg.ppo, ctx.cfg.run
    stage = "ppo_ptx" if ptx else "ppo"
    stage_dir, final, ckpt = open_stage(ctx, stage, "policy")
    if final.is_dir():
        return final
    if ptx and not setup.ptx_examples:
        raise ValueError("ppo --ptx true needs pretraining text: give --data.pretrain FILE ({\"text\": ...} "
                         "records)")
    if not setup.prompts:
        raise ValueError("ppo: no prompts (every one was dropped by the length rule?)")
    policy_model = setup.load_policy(ckpt / "policy" if ckpt else None).to(ctx.device).train()
    value_model = setup.load_value(ckpt / "value" if ckpt else None).to(ctx.device).train()
    run = make_ppo_run(ctx, setup, policy_model, value_model, ptx=ptx)
    state = TrainState(stage_dir, {"policy": policy_model, "value": value_model}, run.optims, ctx.tokenizer,
                       extra=lambda: {"kl_coef": run.kl.coef})
    start = 0
    if ckpt is not None:
        saved = state.restore(ckpt)
        start = saved["step"]
        if cfg.adaptive_kl or saved["kl_coef"] == cfg.kl_coef:
            run.kl.coef = saved["kl_coef"]
        else:  # a fixed beta changed between runs is honoured
            log.warning("resuming with --ppo.kl_coef %g (the checkpoint was trained with %g)", cfg.kl_coef,
                        saved["kl_coef"])
    if ckpt is not None or is_peft(policy_model):
        sync_weights(run)  # the engine started from the SFT weights
    run_steps(stage=stage, seed=run_cfg.seed, start=start, total=cfg.iterations,
              step_fn=lambda step, gen: ppo_iteration(run, step, gen), state=state, log_every=1,
              checkpoint_every=cfg.checkpoint_every, progress=run_cfg.progress, lr=cfg.lr)
    run.engine.close()
    save_models(stage_dir / "final", {"policy": plain(policy_model), "value": plain(value_model)}, ctx.tokenizer)
    (stage_dir / "summary.json").write_text(json.dumps({"ptx": ptx, "kl_coef_final": run.kl.coef}, indent=2))
    return final
