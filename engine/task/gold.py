"""Gold against proxy on the built-in task, at each PPO evaluation (issue 40; Gao et al. 2022): the held-out
labelers' expected utility of the policy's answers (the gold, which the training reward model never saw),
the training reward model's score of the same answers (the proxy), and how far the policy has moved from
where it started, d = sqrt(KL(pi || pi_init)) on those answers."""
from __future__ import annotations

import math

import torch

from ..models.batch import make_batch
from ..models.forward import PolicyLogprobs
from . import decode_response
from .instructions import FEATURES, Instruction, features


def expected_utility(insts: list[Instruction], answers, labelers) -> float:
    """The labelers' mean utility of the answers with their noise averaged out (its mean is 0): the mean over
    answers of the mean over labelers of sum_k w_k * feature_k. answers: [(words, finished)]."""
    total = 0.0
    for inst, (words, finished) in zip(insts, answers):
        f = features(inst, words, finished)
        total += sum(sum(lab.weights[k] * f[k] for k in FEATURES) for lab in labelers) / len(labelers)
    return total / max(len(insts), 1)


@torch.no_grad()
def kl_to_init(policy, init: PolicyLogprobs, batch, temperature: float) -> float:
    """The Monte Carlo KL(pi || pi_init) of whole answers in nats: the mean over answers (sampled from pi at
    `temperature`) of the sum over their tokens of log pi - log pi_init, both at that temperature.
    policy: a causal LM or its PolicyLogprobs; init: the initial policy's PolicyLogprobs."""
    lp = policy if isinstance(policy, PolicyLogprobs) else PolicyLogprobs(policy)
    ratio = (lp(batch, temperature=temperature) - init(batch, temperature=temperature)).double()
    return float((ratio * batch.response_mask).sum(dim=1).mean())


def gold_and_proxy(policy, init, tokenizer, insts, prompts, responses, labelers, proxy, temperature: float,
                   device) -> dict:
    """{"gold", "proxy", "kl_to_init", "d"} of the answers `responses` (token ids, as sampled from `policy`) to
    `prompts`. proxy: batch -> [B] the training reward model's scores, or None (then no "proxy")."""
    answers = [decode_response(tokenizer, r) for r in responses]
    batch = make_batch(prompts, responses, tokenizer.pad_token_id).to(device)
    kl = kl_to_init(policy, init, batch, temperature)
    out = {"gold": expected_utility(insts, answers, labelers), "kl_to_init": kl, "d": math.sqrt(max(kl, 0.0))}
    if proxy is not None:
        out["proxy"] = float(proxy(batch).double().mean())
    return out
