"""PPO's update: several epochs of minibatches over the experience, each one step of the policy's (and the
critic's) optimizer on the clipped policy loss (+ the clipped value loss, + GRPO's KL term, + PPO-ptx's LM
loss), every process computing its share of each minibatch's rows."""
from __future__ import annotations

from typing import Callable

import torch

import kernels
from kernels import kl_loss, masked_mean, policy_loss, value_loss

from ..models.forward import PolicyLogprobs, TokenValues
from ..parallel import distributed as dist
from .experience import Experience
from .lm import lm_loss_part
from .ppo_setup import PPORun


def _count(mask: torch.Tensor, loss_agg: str) -> float:
    """What a loss aggregation averages over: tokens (token-mean) or answers with a token."""
    return float(mask.sum() if loss_agg == "token-mean" else (mask.sum(1) > 0).sum())


def ppo_minibatch_loss(policy: PolicyLogprobs, value: TokenValues | None, exp: Experience, idx, cfg,
                       temperature: float, ptx: Callable[[], torch.Tensor] | None = None, norm_len: float | None = None,
                       whole=None, record: list | None = None):
    """Loss of one minibatch: the clipped policy loss (+ vf_coef * the clipped value loss with a critic,
    + kl_loss_coef * KL to the reference, + ptx_coef * the LM loss). norm_len: the constant of
    loss_agg="seq-mean-token-sum-norm" (the longest answer allowed).

    whole: the rows of the global minibatch when `idx` is this process's share of it (engine.parallel.distributed):
    each term and statistic is then this process's part of the global one (the parts sum to it); ptx()
    returns its own part. None: idx is the whole minibatch. record: a list to append (idx, the policy's
    detached log-probs of those rows) to."""
    mb = exp.batch.select(idx)
    mask = mb.response_mask
    whole_mask = mask if whole is None else exp.batch.response_mask[whole]

    def part(x, agg="token-mean"):
        return dist.part(x, _count(mask, agg), _count(whole_mask, agg))
    lp, ent = policy(mb, temperature, return_entropy=True)
    # on-policy (one update from the sampling policy): the old log-probs are this forward's, detached
    old = exp.old_logprobs[idx] if exp.old_logprobs is not None else lp.detach()
    is_weights, is_stats = None, {}
    correction = off_policy(cfg)
    if correction is not None and exp.engine_logprobs is not None:
        # The samples came from the engine's distribution (another numerics, or with max_staleness an older
        # policy), the clip is around the trainer's policy at the update's start: reweight by pi_old / pi_engine
        is_weights, is_stats = kernels.off_policy_weights(old, exp.engine_logprobs[idx], mask, mode=correction[0],
                                                          cap=correction[1])
    pg, pg_stats = policy_loss(lp, old, exp.advantages[idx], mask, cfg.clip_eps,
                               is_weights=is_weights, clip_high=cfg.clip_high or None, loss_agg=cfg.loss_agg,
                               norm_len=norm_len)
    loss = part(pg, cfg.loss_agg)
    stats = {"pg_loss": loss.item(), "entropy": part(masked_mean(ent, mask)).item(),
             **{k: part(v) for k, v in pg_stats.items()}, **{k: part(v) for k, v in is_stats.items()}}
    if record is not None:  # this forward's log-probs of rows idx (the on-policy update's old log-probs)
        record.append((idx, lp.detach()))
    if value is not None:
        vf, vf_stats = value_loss(value(mb), exp.old_values[idx], exp.returns[idx], mask, cfg.value_clip_eps)
        vf = part(vf)
        loss = loss + cfg.vf_coef * vf
        stats.update(vf_loss=vf.item(), **{k: part(v) for k, v in vf_stats.items()})
    if cfg.kl_loss_coef > 0:
        kl, _ = kl_loss(lp, exp.ref_logprobs[idx], mask, estimator=cfg.kl_loss_estimator,
                        loss_agg=cfg.loss_agg, norm_len=norm_len)
        kl = part(kl, cfg.loss_agg)
        loss = loss + cfg.kl_loss_coef * kl
        stats["kl_loss"] = kl.item()
    if ptx is not None:
        ptx_loss = ptx()
        loss = loss + cfg.ptx_coef * ptx_loss
        stats["ptx_loss"] = ptx_loss.item()
    return loss, stats


def off_policy(cfg) -> tuple[str, float] | None:
    """(correction, cap) of the importance weights to the rollout engine, or None. cfg: PPOConfig. With
    max_staleness > 0 always (off_policy_correction, tis_cap or 2); otherwise TIS when tis_cap > 0."""
    if cfg.max_staleness > 0:
        return cfg.off_policy_correction, cfg.tis_cap or 2.0
    return ("tis", cfg.tis_cap) if cfg.tis_cap > 0 else None


def ppo_update(run: PPORun, exp: Experience, gen: torch.Generator) -> dict[str, list]:
    """cfg.epochs passes over the rollouts in minibatches; each minibatch one step of both optimizers. Every
    process draws the same global minibatches and computes its share of each one's rows."""
    cfg = run.cfg
    ptx = (lambda: ptx_loss(run, gen)) if run.ptx else None
    stats: dict[str, list] = {}
    record = [] if exp.old_logprobs is None else None
    for _ in range(cfg.epochs):
        for mb in torch.randperm(exp.batch.input_ids.shape[0], generator=gen).split(cfg.minibatch):
            mb = mb.to(run.device)
            loss, s = ppo_minibatch_loss(run.policy, run.value, exp, mb[dist.rows(len(mb))], cfg,
                                         run.rollout_cfg.temperature, ptx, norm_len=run.rollout_cfg.max_new_tokens,
                                         whole=mb, record=record)
            for optim in run.optims.values():
                optim.zero_grad()
            dist.backward(loss)
            for optim in run.optims.values():
                optim.step()
            s["loss"] = loss.item()
            for k, v in dist.all_sum(s).items():
                stats.setdefault(k, []).append(v)
    if record is not None:  # the old log-probs the update used, [B, R] on every process (for the metrics)
        mask = exp.batch.response_mask
        old = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for idx, lp in record:
            old[idx] = lp.to(old.dtype)
        exp.old_logprobs = dist.sum_rows(old)
    return stats


def ptx_loss(run: PPORun, gen: torch.Generator) -> torch.Tensor:
    """PPO-ptx: the LM loss on a batch of pretraining text (this process's part of it)."""
    corpus = run.setup.ptx_examples
    idx = torch.randint(0, len(corpus), (run.cfg.ptx_batch,), generator=gen).tolist()
    return lm_loss_part(run.policy, corpus, idx, run.pad_id)
