"""Evaluation the way InstructGPT did it: held-out labelers compare two policies' answers to held-out
prompts (win rate, ties count half); plus the alignment tax, the LM loss on held-out pretraining text."""
from __future__ import annotations

import random

import torch

from ..data.encode import Encoder, text_examples
from . import decode_response
from .instructions import FEATURES, Instruction, features


@torch.no_grad()
def sample_answers(policy, tokenizer, insts: list[Instruction], *, temperature: float, max_tokens: int,
                   seed: int, chunk: int = 128) -> list[tuple[str, bool]]:
    """One sampled answer per prompt -> [(words, finished)]."""
    _, responses = sample_tokens(policy, tokenizer, insts, temperature=temperature, max_tokens=max_tokens,
                                 seed=seed, chunk=chunk)
    return [decode_response(tokenizer, r) for r in responses]


@torch.no_grad()
def sample_tokens(policy, tokenizer, insts: list[Instruction], *, temperature: float, max_tokens: int,
                  seed: int, chunk: int = 128) -> tuple[list[list[int]], list[list[int]]]:
    """One sampled answer per prompt -> (prompt ids, response ids as generated, <eos> included when it ended)."""
    enc = Encoder(tokenizer)
    prompts = [enc.prompt(x.prompt) for x in insts]
    return prompts, generate_ids(policy, tokenizer, prompts, temperature=temperature, max_tokens=max_tokens,
                                 seed=seed, chunk=chunk)


@torch.no_grad()
def generate_ids(policy, tokenizer, prompts: list[list[int]], *, temperature: float, max_tokens: int, seed: int,
                 chunk: int = 128) -> list[list[int]]:
    """One sampled answer (token ids as generated) per prompt (token ids), `chunk` prompts at a time."""
    from ..rollout import HFRollout

    rollout = HFRollout(policy, seed=seed, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    out = []
    for i in range(0, len(prompts), chunk):
        out += [list(r.token_ids) for r in rollout.generate(prompts[i:i + chunk], max_tokens=max_tokens,
                                                            temperature=temperature)]
    return out


def win_rate(insts, answers_a, answers_b, labelers, seed: int) -> dict:
    """How often held-out labelers prefer a over b; prompt i is judged by labeler i mod len(labelers)."""
    rng = random.Random(f"judge-{seed}")
    wins = ties = 0
    for i, (inst, (a, fa), (b, fb)) in enumerate(zip(insts, answers_a, answers_b)):
        verdict = labelers[i % len(labelers)].compare(inst, a, b, rng, fa, fb)
        wins += verdict == 1.0
        ties += verdict == 0.5
    n = len(insts)
    return {"win_rate": (wins + 0.5 * ties) / max(n, 1), "wins": wins, "ties": ties, "losses": n - wins - ties,
            "n": n}


def answer_quality(insts, answers) -> dict:
    """Mean of each hidden-preference feature: what the labelers are reacting to (diagnostic only)."""
    rows = [features(i, a, f) for i, (a, f) in zip(insts, answers)]
    return {k: sum(r[k] for r in rows) / max(len(rows), 1) for k in FEATURES}


@torch.no_grad()
def corpus_loss(policy, tokenizer, texts: list[str], chunk: int = 256) -> float:
    """Mean NLL (nats per token) of held-out pretraining text: the alignment-tax measure."""
    from ..models.forward import PolicyLogprobs
    from ..trainers.lm import lm_loss

    lp = PolicyLogprobs(policy)
    was = lp.training
    lp.eval()
    total = count = 0.0
    for i in range(0, len(texts), chunk):
        pairs = text_examples(tokenizer, texts[i:i + chunk], max_tokens=1 << 20)
        n = sum(len(r) for _, r in pairs)
        total += lm_loss(lp, [p for p, _ in pairs], [r for _, r in pairs], tokenizer.pad_token_id).item() * n
        count += n
    lp.train(was)
    return total / count
