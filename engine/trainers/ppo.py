"""PPO against the reward model (InstructGPT section 3.5), PPO-ptx, and the critic-free estimators (GRPO,
Dr. GRPO, RLOO, REINFORCE++, with DAPO's loss options) on the same loop.

One iteration (`ppo_iteration`, read it top to bottom), each phase in a file of its own:
- `ppo_rollouts`: sample prompts and generate n answers each with the current policy, and score them (the RM
  and/or a reward function; with drop_constant_groups, groups that all score the same are dropped and
  refilled, DAPO's dynamic sampling);
- `experience`: per-token log-probs of the policy (old) and of the SFT reference, and values (with a critic);
  shaped rewards (`kernels.shape_rewards`: the score at the last token minus beta * KL to the SFT model);
  advantages by the configured estimator (`kernels.estimate_advantages`: the one place it is chosen);
- `ppo_update`: several epochs of minibatches with the clipped policy loss (+ the clipped value loss with a
  critic, + GRPO's KL term, + gamma times the pretraining LM loss for PPO-ptx);
- `ppo_rollouts` again: the new weights into the rollout engine; then beta adapts (`KLController`) and
  `ppo_metrics` says what happened.
`ppo_setup` builds the run once (the value model starts as the RM); this file runs it: the loop, resume and
the final models.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..models.loading import placed
from ..models.lora import is_peft, merged_named_weights, plain
from ..parallel import distributed as dist
from ..rundir.final import save_models
from .experience import make_experience
from .loop import run_steps
from .passes import needs_reference, old_logprobs_source
from .ppo_metrics import iteration_metrics
from .ppo_rollouts import collect_rollouts, engine_asleep, engine_logprobs, score_rollouts, sync_weights
from .ppo_setup import PPORun, PPOSetup, close_engine, make_ppo_run
from .ppo_update import ppo_update
from .state import TrainState, open_stage, saved_model

log = logging.getLogger("engine")


def ppo_iteration(run: PPORun, step: int, gen: torch.Generator) -> dict:
    """One PPO iteration; returns its metrics."""
    cfg, rcfg, setup, phase = run.cfg, run.rollout_cfg, run.setup, run.phases
    if run.pipeline is None:
        rollouts = collect_rollouts(run, step, gen)
    else:
        with phase("wait"):  # the trainer idle until the engine process has the batch
            idx, version, results, engine_s = run.pipeline.take(step)
        rollouts = score_rollouts(run, step, [idx[r.prompt_index] for r in results], results)
    with engine_asleep(run):
        eng = engine_logprobs(rollouts.results, rollouts.batch.response_mask)
        exp = make_experience(run.policy, run.ref, run.value, rollouts.batch, rollouts.scores, kl_coef=run.kl.coef,
                              cfg=cfg, temperature=rcfg.temperature, phase=phase, use_ref=needs_reference(cfg),
                              old=old_logprobs_source(cfg), engine_lp=eng, turn_rewards=rollouts.turn_rewards)
        with phase("update"):
            stats = ppo_update(run, exp, gen)
    with phase("sync"):
        if run.pipeline is None:
            sync_weights(run)
        else:  # into shared memory, and the next batch asked for
            run.pipeline.advance(step, merged_named_weights(run.policy.lm))
    metrics = iteration_metrics(exp, rollouts.results, stats, run.kl.coef, cfg.kl_estimator)
    if setup.reward_spread:  # this process's answers: the ensemble's members' disagreement
        metrics["reward_spread"] = sum(setup.reward_spread) / len(setup.reward_spread)
        setup.reward_spread.clear()
    if run.pipeline is not None:
        metrics.update(policy_version=version, staleness=step - version, engine_generate_s=engine_s)
    if hasattr(run.engine, "held_bytes"):  # what this rank's rollout engine holds (1/TP of the policy)
        metrics["engine_weights_mib"] = run.engine.held_bytes() / 2**20
    rows, width = exp.batch.input_ids.shape  # this rank's padded tokens in one minibatch's pass
    metrics["padded_tokens_per_rank"] = len(dist.rows(min(cfg.minibatch, rows))) * width
    if cfg.drop_constant_groups:
        metrics.update(groups_dropped=rollouts.groups_dropped, answers=len(rollouts.results))
    if "kl" in metrics:
        run.kl.update(metrics["kl"], len(rollouts.results))
    if setup.evaluate is not None and ((step + 1) % cfg.eval_every == 0 or step == 0) and run.plain_policy():
        with phase("evaluate"):  # every process evaluates the same whole policy the same way
            metrics.update(setup.evaluate(run.plain_policy()))
    metrics.update(phase.pop())
    return metrics


def train_ppo(ctx, setup: PPOSetup, *, ptx: bool) -> Path:
    """Run PPO (or PPO-ptx) from the SFT policy and the RM; returns the final policy directory."""
    stage = "ppo_ptx" if ptx else "ppo"
    stage_dir, final, ckpt = open_stage(ctx, stage, "policy")
    if final.is_dir():
        return final
    if ptx and not setup.ptx_examples:
        raise ValueError("ppo --ptx true needs pretraining text: give --data.pretrain FILE ({\"text\": ...} "
                         "records)")
    if not setup.prompts:
        raise ValueError("ppo: no prompts (every one was dropped by the length rule?)")
    policy_model = placed(setup.load_policy(saved_model(ckpt, "policy")), ctx.device).train()
    models = {"policy": policy_model}
    if setup.load_value is not None:  # a critic (GAE); the critic-free estimators train the policy alone
        models["value"] = placed(setup.load_value(saved_model(ckpt, "value")), ctx.device).train()
    run = make_ppo_run(ctx, setup, policy_model, models.get("value"), ptx=ptx)
    try:
        return _train(ctx, run, models, stage_dir, final, ckpt, ptx)
    finally:
        close_engine(run)


def _train(ctx, run: PPORun, models: dict, stage_dir: Path, final: Path, ckpt: Path | None, ptx: bool) -> Path:
    cfg, run_cfg, stage, policy_model = ctx.cfg.ppo, ctx.cfg.run, run.stage, models["policy"]

    def extra() -> dict:  # with max_staleness, the batches already generated from older weights
        pending = {"async_pending": run.pipeline.pending_state()} if run.pipeline else {}
        return {"kl_coef": run.kl.coef, **pending}
    state = TrainState(stage_dir, models, run.optims, ctx.tokenizer, extra=extra)
    start, saved = 0, {}
    if ckpt is not None:
        saved = state.restore(ckpt)
        start = saved["step"]
        if cfg.adaptive_kl or saved["kl_coef"] == cfg.kl_coef:
            run.kl.coef = saved["kl_coef"]
        else:  # a fixed beta changed between runs is honoured
            log.warning("resuming with --ppo.kl_coef %g (the checkpoint was trained with %g)", cfg.kl_coef,
                        saved["kl_coef"])
    if run.pipeline is not None:
        run.pipeline.start(start, merged_named_weights(policy_model), saved.get("async_pending"),
                           ckpt / "trainer.json" if ckpt is not None else None)
    elif ckpt is not None or is_peft(policy_model):
        sync_weights(run)  # the engine started from the SFT weights
    run_steps(stage=stage, seed=run_cfg.seed, start=start, total=cfg.iterations,
              step_fn=lambda step, gen: ppo_iteration(run, step, gen), state=state, log_every=1,
              checkpoint_every=cfg.checkpoint_every, progress=run_cfg.progress, lr=cfg.lr)
    save_models(stage_dir / "final", {name: plain(m) for name, m in models.items()}, ctx.tokenizer)
    if dist.world().main:
        (stage_dir / "summary.json").write_text(json.dumps({"ptx": ptx, "kl_coef_final": run.kl.coef}, indent=2))
    return final
