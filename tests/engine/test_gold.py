"""Gold against proxy at PPO's evaluations: the KL to the initial policy estimated from the policy's own
answers against the exact KL of a next-token distribution, and the gold as the labelers' own utility with
their noise averaged out."""
import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.models.batch import make_batch
from engine.models.forward import PolicyLogprobs
from engine.task.gold import expected_utility, kl_to_init
from engine.task.instructions import sample_instruction
from engine.task.people import Labeler, candidate_response, make_labelers


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # logits far from uniform, so the KL is not tiny
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_to_init_on_the_policys_own_answers_matches_the_exact_kl(temperature):
    policy, init = _llama(1), _llama(2)
    prompt = [3, 14, 15, 9, 2, 6]
    with torch.no_grad():
        p = torch.log_softmax(policy(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
        q = torch.log_softmax(init(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
    exact = float((p.exp() * (p - q)).sum())
    spread = math.sqrt(float((p.exp() * (p - q) ** 2).sum()) - exact ** 2)
    n = 4000
    answers = torch.multinomial(p.exp(), n, replacement=True).tolist()  # one-token answers sampled from pi
    batch = make_batch([prompt] * n, [[a] for a in answers], 0)
    got = kl_to_init(policy, PolicyLogprobs(init), batch, temperature)
    assert exact > 0.05
    assert got == pytest.approx(exact, abs=5 * spread / math.sqrt(n))  # 5 standard errors of the mean
    assert kl_to_init(PolicyLogprobs(init), PolicyLogprobs(init), batch, temperature) == 0.0


def test_gold_is_the_labelers_utility_with_the_noise_averaged_out():
    rng = random.Random()
    insts = [sample_instruction(rng) for _ in range(40)]
    answers = [candidate_response(i, rng) for i in insts]
    labelers = make_labelers(3, 100, noise=0.8, spread=0.5, seed=rng.randrange(1000))
    quiet = [Labeler(lab.id, lab.weights, 0.0) for lab in labelers]
    by_hand = sum(sum(lab.utility(i, a, f, rng) for lab in quiet) / 3 for i, (a, f) in zip(insts, answers)) / 40
    assert expected_utility(insts, answers, labelers) == pytest.approx(by_hand, abs=1e-12)
    noisy = sum(labelers[k % 3].utility(i, a, f, rng) for k in range(300)
                for i, (a, f) in zip(insts, answers)) / (300 * 40)
    assert noisy == pytest.approx(by_hand, abs=0.03)  # 12,000 draws of noise 0.8: standard error 0.007
