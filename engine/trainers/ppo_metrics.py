"""What one PPO iteration logs: the update's means, KL to the reference, scores, rewards, answer lengths, and
how far the rollout engine's log-probs are from the trainer's."""
from __future__ import annotations

import torch

import kernels

from .experience import Experience


def iteration_metrics(exp: Experience, results, stats: dict[str, list], kl_coef: float, estimator: str) -> dict:
    """The iteration's means. "kl" (to the reference, per sequence) only when the reference ran."""
    mask = exp.batch.response_mask
    m = {k: sum(v) / len(v) for k, v in stats.items()}
    kl = exp.kl
    if kl is None and exp.ref_logprobs is not None:  # the old log-probs came from the update's forward
        kl = kernels.kl_penalty(exp.old_logprobs, exp.ref_logprobs, estimator=estimator)
    if kl is not None:
        m["kl"] = (kl * mask).sum(1).mean().item()
    m.update(score=exp.scores.mean().item(), kl_coef=kl_coef,
             reward=(exp.rewards * mask).sum(1).mean().item(), response_len=mask.sum(1).float().mean().item(),
             finished=sum(r.finish_reason == "stop" for r in results) / len(results))
    episodes = [r.episode for r in results if r.episode is not None]
    if episodes:  # several turns with an environment: the response is the whole episode after the prompt
        m.update({"episodes/turns": sum(e.turns for e in episodes) / len(episodes),
                  "episodes/tokens": sum(len(r.token_ids) for r in results) / len(results),
                  "episodes/masked_share": 1 - mask.sum().item() / max(1, sum(len(r.token_ids) for r in results)),
                  "episodes/env_reward": sum(e.reward for e in episodes) / len(episodes),
                  "episodes/done": sum(e.done for e in episodes) / len(episodes)})
        for kind in sorted({e.failure for e in episodes if e.failure}):  # the environment's failures, by kind
            m[f"episodes/env_{kind}"] = float(sum(e.failure == kind for e in episodes))
    if exp.old_logprobs is not exp.engine_logprobs:  # (taken from the engine, they are its own)
        m.update(engine_mismatch(exp.engine_logprobs, exp.old_logprobs, mask))
    return m


def engine_mismatch(eng, old_lp, mask) -> dict:
    """|logp_engine - logp_trainer| over sampled tokens, and the share of ratios outside [0.9, 1.1]."""
    diff = (eng - old_lp).abs()[mask]
    ratio = torch.exp(old_lp - eng)[mask]
    return {"logprob_diff_mean": diff.mean().item(), "logprob_diff_max": diff.max().item(),
            "ratio_outside_0.9_1.1": ((ratio < 0.9) | (ratio > 1.1)).float().mean().item()}
