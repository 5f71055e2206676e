"""Gold against proxy at PPO's evaluations: the KL to the initial policy estimated from the policy's own
answers against the exact KL of a next-token distribution, and the gold as the labelers' own utility with
their noise averaged out."""
import json
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


def words(prompts, responses):
    """A gold function for the tests: the answer's word count."""
    return [float(len(r.split())) for r in responses]


def one_point(prompts, responses):
    return [1.0] * len(responses)


def _user_ppo(tiny_models, tmp_path, *flags):
    from flag_bundles import cli_with_bundles as cli
    from test_local_models import EXAMPLES, FEW

    return cli(["ppo", "--policy.path", str(tiny_models["qwen2"]), "--out", str(tmp_path / "run"),
                "--data.prompts", str(EXAMPLES / "prompts.jsonl"), *FEW, *flags])


def test_your_model_judged_by_a_gold_reward_model_with_its_own_tokenizer(tiny_models, tmp_path):
    """Qwen2 trained on a reward function, judged at each evaluation by a GPT-2 reward model (another
    tokenizer: answers re-tokenized) on held-out prompts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from test_local_models import EXAMPLES

    gold = tmp_path / "gold"
    AutoModelForSequenceClassification.from_pretrained(tiny_models["gpt2"], num_labels=1).save_pretrained(gold)
    AutoTokenizer.from_pretrained(tiny_models["gpt2"]).save_pretrained(gold)
    code = _user_ppo(tiny_models, tmp_path, "--reward.fn", "test_gold:one_point", "--gold.path", str(gold),
                           "--data.eval_prompts", str(EXAMPLES / "prompts.jsonl"), "--ppo.eval_every", "1",
                           "--ppo.eval_prompts", "3")
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(k in r for r in rows for k in ("gold", "proxy", "d_to_init", "gold_sft"))
    assert all(r["proxy"] == 1.0 == r["proxy_sft"] for r in rows)  # the proxy is the reward trained on
    assert rows[0]["gold_sft"] == rows[1]["gold_sft"] and rows[0]["gold"] != 0.0
    assert all(r["d_to_init"] == pytest.approx(max(r["kl_to_init"], 0.0) ** 0.5) for r in rows)


@pytest.mark.parametrize("flags,message", [
    (["--gold.fn", "words"], "gold.fn must be package.module:function, got 'words'"),
    (["--gold.fn", "test_gold:words", "--gold.path", "x"], "give one gold: --gold.path (a reward model) or"),
    (["--gold.fn", "no_such_module_xyz:f", "--data.eval_prompts", "PROMPTS"],
     "--gold.fn no_such_module_xyz:f: cannot import 'no_such_module_xyz'"),
    (["--gold.fn", "test_gold:nothing_here", "--data.eval_prompts", "PROMPTS"],
     "--gold.fn test_gold:nothing_here: test_gold has no function 'nothing_here'"),
    (["--gold.fn", "test_gold:words"], "--gold.* with --policy.path needs --data.eval_prompts FILE"),
    (["--gold.path", "/nonexistent/gold", "--data.eval_prompts", "PROMPTS"], "--gold.path"),
    (["--data.eval_prompts", "PROMPTS"], "--data.eval_prompts (the gold judges answers to them: give --gold.path "
                                         "or --gold.fn)"),
])
def test_bad_gold_settings_are_refused_by_name(tiny_models, tmp_path, capsys, flags, message):
    from test_local_models import EXAMPLES

    flags = [str(EXAMPLES / "prompts.jsonl") if f == "PROMPTS" else f for f in flags]
    code = _user_ppo(tiny_models, tmp_path, "--reward.fn", "test_gold:one_point", *flags)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "ppo" / "final").exists()


def test_the_built_in_task_refuses_another_gold(tmp_path, tiny, capsys):
    from engine.cli import main

    assert main(["ppo", "--out", str(tmp_path / "run"), *tiny("ppo"), "--gold.fn", "test_gold:words"]) == 2
    assert "--gold.fn (the built-in task's gold is its held-out labelers)" in capsys.readouterr().err
