"""Gold against proxy on your own model (issue 40): at each PPO evaluation, on --data.eval_prompts, the gold
(--gold.path, a reward model the run never trained on, or --gold.fn, a function with --reward.fn's contract),
the proxy (the reward the run trains on: the reward model and/or --reward.fn, as PPO scores) and d = sqrt(KL
to the starting policy) on the policy's own answers. The built-in task's gold is its held-out labelers
(engine/task/gold.py); this is the same measurement where people are not simulated.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .models.batch import make_batch
from .models.forward import SequenceScores
from .models.loading import load_model, load_tokenizer
from .reward_fn import call_reward_fn, load_reward_fn, prompt_text
from .task.gold import kl_to_init


def gold_scorer(ctx, records: list, enc, reward_scorer: Callable) -> Callable:
    """score(batch, prompt indices, results) -> gold [B]. reward_scorer: stages._reward_scorer, which
    re-tokenizes for a gold reward model with its own tokenizer."""
    cfg = ctx.cfg
    if cfg.gold.fn:
        fn, spec = load_reward_fn(cfg.gold.fn, "--gold.fn"), cfg.gold.fn

        def by_function(batch, idx, results):
            return call_reward_fn(fn, spec, [prompt_text(records[i]) for i in idx],
                                  [enc.text_of(r.token_ids) for r in results], flag="--gold.fn")
        return by_function
    tok = load_tokenizer(cfg.gold.path, "--gold.path")
    model = load_model(cfg.gold.path, flag="--gold.path", scalar=True, device=ctx.device, run=cfg.run,
                       tokenizer=tok, head_required=True)
    return reward_scorer(ctx, SequenceScores(model), tok, cfg.gold.path, records, enc)


def gold_evaluator(ctx, init, prompts: list[list[int]], gold: Callable, proxy: Callable) -> Callable:
    """evaluate(policy) -> {"gold", "proxy", "kl_to_init", "d_to_init", "gold_sft", "proxy_sft"}: means over
    one sampled answer to each prompt (token ids) at --eval.temperature, the starting policy's (`init`, a
    PolicyLogprobs) measured once, here. gold/proxy: score(batch, prompt indices, results) -> [B]."""
    from .rollout import HFRollout

    cfg, tok = ctx.cfg, ctx.tokenizer
    temperature, idx = cfg.eval.temperature, list(range(len(prompts)))

    @torch.no_grad()
    def measure(policy) -> dict:
        results = HFRollout(policy, seed=cfg.eval.seed, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id).generate(prompts, max_tokens=cfg.rollout.max_new_tokens,
                                                                   temperature=temperature)
        batch = make_batch(prompts, [r.token_ids for r in results], tok.pad_token_id).to(ctx.device)
        kl = kl_to_init(policy, init, batch, temperature)
        return {"gold": float(gold(batch, idx, results).double().mean()),
                "proxy": float(proxy(batch, idx, results).double().mean()),
                "kl_to_init": kl, "d_to_init": math.sqrt(max(kl, 0.0))}
    start = measure(init)
    start = {"gold_sft": start["gold"], "proxy_sft": start["proxy"]}

    def evaluate(policy) -> dict:
        return {**measure(policy), **start}
    return evaluate
