"""PPO's experience: one batch of scored rollouts turned into what the update trains on (the policy's old
and the reference's log-probs, the critic's values, shaped rewards and advantages), by the kernels' pure
functions (`kernels.shape_rewards`, `kernels.estimate_advantages`: the one place the estimator is chosen)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels

from ..models.batch import SequenceBatch
from ..models.forward import PolicyLogprobs, TokenValues
from ..parallel import distributed as dist
from .phases import no_phases


@dataclass
class Experience:
    """One iteration's rollouts; every [B, R] tensor is aligned with batch.response_mask."""
    batch: SequenceBatch
    old_logprobs: torch.Tensor | None  # [B, R] policy at sampling time (None: taken from the update's forward)
    ref_logprobs: torch.Tensor | None  # [B, R] SFT reference (None: nothing reads it, the pass is skipped)
    old_values: torch.Tensor     # [B, R] (zeros without a critic)
    scores: torch.Tensor         # [B] reward of each whole answer
    rewards: torch.Tensor        # [B, R] shaped
    kl: torch.Tensor | None      # [B, R] per-token KL estimate (None until both log-probs are known)
    advantages: torch.Tensor     # [B, R]
    returns: torch.Tensor | None  # [B, R] the value loss's target (GAE only)
    engine_logprobs: torch.Tensor | None = None  # [B, R] what the rollout engine reported when sampling


@torch.no_grad()
def make_experience(policy: PolicyLogprobs, ref: PolicyLogprobs | None, value: TokenValues | None,
                    batch: SequenceBatch, scores: torch.Tensor, *, kl_coef: float, cfg, temperature: float,
                    phase=no_phases, use_ref: bool = True, old: str = "trainer",
                    engine_lp: torch.Tensor | None = None, turn_rewards: torch.Tensor | None = None) -> Experience:
    """Log-probs, values, rewards and advantages of one batch of scored rollouts. cfg: PPOConfig.

    ref: the frozen SFT policy, or None for the policy with its LoRA adapters disabled (one base in memory).
    use_ref=False: no reference pass (nothing reads it; kl_coef must be 0). value: the critic, or None for a
    critic-free estimator. scores [B]: each answer's reward; rows are prompt-major, cfg.samples_per_prompt per
    prompt. old: where the old log-probs come from (`old_logprobs_source`); "engine" takes `engine_lp` [B, R].
    phase(name): a context timing each part (engine.trainers.phases.Phases). turn_rewards [B, R]: an
    environment's rewards at the turns' last tokens, added to the shaped rewards (and to `scores`).
    """
    if not use_ref and kl_coef:
        raise ValueError("make_experience: a KL penalty (kl_coef > 0) needs the reference's log-probs")
    was = policy.training, value is not None and value.training
    policy.eval()
    mask, n = batch.response_mask, batch.input_ids.shape[0]

    def per_rank(model, **kw):  # each process its rows; the [B, R] result gathered onto every process
        return dist.map_rows(lambda ix: model(batch.select(ix), **kw), n)
    old_lp = ref_lp = None
    if old == "trainer":
        with phase("logprobs"):
            old_lp = per_rank(policy, temperature=temperature)
    elif old == "engine":
        old_lp = engine_lp
    if use_ref:
        with phase("ref_logprobs"):
            if ref is None:
                with policy.lm.disable_adapter():
                    ref_lp = per_rank(policy, temperature=temperature)
            else:
                ref_lp = per_rank(ref, temperature=temperature)
    values = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if value is not None:
        with phase("values"):
            value.eval()
            values = per_rank(value) * mask
            value.train(was[1])
    with phase("advantages"):
        # Without a KL penalty the rewards are the scores at each answer's last token, whatever the log-probs.
        lp = old_lp if old_lp is not None and ref_lp is not None else values.new_zeros(mask.shape)
        rewards, kl = kernels.shape_rewards(scores, lp, ref_lp if lp is old_lp else lp, mask, kl_coef=kl_coef,
                                            estimator=cfg.kl_estimator, backend=cfg.backend)
        if turn_rewards is not None:
            rewards, scores = rewards + turn_rewards, scores + turn_rewards.sum(1)
        adv, ret = kernels.estimate_advantages(cfg.advantage_estimator, rewards, mask, values=values,
                                               n=cfg.samples_per_prompt, gamma=cfg.gamma, lam=cfg.lam,
                                               whiten=cfg.whiten_advantages, backend=cfg.backend)
    policy.train(was[0])
    return Experience(batch, old_lp, ref_lp, values, scores, rewards, kl if lp is old_lp else None, adv, ret,
                      engine_logprobs=engine_lp)
