"""Which passes an iteration runs: none that cannot change the result. A forward over every answer costs as
much as an optimizer step's forward, so the reference and the old-log-prob passes run only when something
reads them (cfg: engine.config.PPOConfig)."""
from __future__ import annotations


def needs_reference(cfg) -> bool:
    """Whether anything reads the reference's log-probs (cfg: PPOConfig): the KL penalty in the reward (or its
    adaptive controller), GRPO's KL loss, or the KL metric asked for with --ppo.log_kl."""
    return cfg.kl_coef > 0 or cfg.adaptive_kl or cfg.kl_loss_coef > 0 or cfg.log_kl


def old_logprobs_source(cfg) -> str:
    """Where the old (sampling-time) log-probs come from: "trainer" (a no-grad forward before the update),
    "update" (the update's own forward, detached: exact when the one update of an iteration starts from the
    sampling policy, one epoch of one minibatch, and no reward reads them before it, i.e. no KL penalty in the
    reward) or "engine" (the rollout engine's log-probs of the sampled tokens). cfg: PPOConfig."""
    if cfg.old_logprobs != "auto":
        return cfg.old_logprobs
    on_policy = cfg.epochs == 1 and cfg.minibatch == cfg.rollout_batch * cfg.samples_per_prompt
    return "update" if on_policy and cfg.kl_coef == 0 and not cfg.adaptive_kl else "trainer"
