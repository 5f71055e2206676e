"""The critic-free estimators on the PPO loop: each estimator's first update against one computed by hand,
rewards from a Python function, and runs through the CLI (GRPO with a verifiable reward, dynamic sampling,
no value model), with bad input named."""
import json
import math
import shutil

import pytest
import torch
from torch import nn

from engine.models.batch import make_batch
from engine.config import PPOConfig
from engine.trainers.experience import make_experience
from engine.trainers.ppo_update import ppo_minibatch_loss

SCORES = [1.0, 3.0, 2.0, 2.0]          # two prompts, n = 2 answers each: one group informative, one flat
LENGTHS = [2, 3, 1, 2]                 # answer lengths (tokens)


class TablePolicy(nn.Module):
    """A "policy" whose log-prob of each answer token is a parameter: its gradient is the loss's gradient
    with respect to the log-probs, so an SGD step on it can be checked by hand."""

    def __init__(self, logprobs):
        super().__init__()
        self.table = nn.Parameter(logprobs.clone())

    def forward(self, batch, temperature=1.0, return_entropy=False):
        lp = self.table * batch.response_mask
        return (lp, torch.zeros_like(lp)) if return_entropy else lp


class ZeroValues(nn.Module):
    def forward(self, batch):
        return torch.zeros(batch.response_mask.shape)


def first_update(estimator, loss_agg="token-mean", n=2):
    batch = make_batch([[1, 5]] * 4, [[7] * k for k in LENGTHS], 0)
    policy = TablePolicy(torch.full(batch.response_mask.shape, -1.0))
    ref = TablePolicy(torch.full(batch.response_mask.shape, -1.0))
    cfg = PPOConfig(advantage_estimator=estimator, samples_per_prompt=n, loss_agg=loss_agg, whiten_advantages=False,
                    minibatch=4, rollout_batch=4 // n)
    value = ZeroValues() if estimator == "gae" else None
    exp = make_experience(policy, ref, value, batch, torch.tensor(SCORES), kl_coef=0.0, cfg=cfg, temperature=1.0)
    loss, _ = ppo_minibatch_loss(policy, value, exp, torch.arange(4), cfg, 1.0, norm_len=3)
    loss.backward()
    before = policy.table.detach().clone()
    torch.optim.SGD(policy.parameters(), lr=1.0).step()
    return exp.advantages, policy.table.detach() - before, batch.response_mask


def by_answer(values_per_answer):
    """[B, R] with each answer's value on its tokens, 0 elsewhere."""
    out = torch.zeros(4, 3)
    for b, (v, k) in enumerate(zip(values_per_answer, LENGTHS)):
        out[b, :k] = v
    return out


S2 = math.sqrt(2.0)
HAND = {  # each answer's advantage, by hand from SCORES: groups (1, 3) and (2, 2)
    "grpo": [-1 / (S2 + 1e-6), 1 / (S2 + 1e-6), 0.0, 0.0],   # (s - 2) / (std = sqrt(2))
    "drgrpo": [-1.0, 1.0, 0.0, 0.0],                      # s - mean
    "rloo": [-2.0, 2.0, 0.0, 0.0],                        # s - the other answer's score
}


@pytest.mark.parametrize("estimator", list(HAND))
def test_group_estimators_first_update_by_hand(estimator):
    adv, step, mask = first_update(estimator)
    want = by_answer(HAND[estimator])
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=1e-6)
    # at the first update the ratio is 1: d loss / d logp = -A / (number of tokens), so SGD adds A / 8
    torch.testing.assert_close(step, want / mask.sum(), atol=1e-7, rtol=1e-6)


def test_gae_and_reinforce_pp_first_update_by_hand():
    # GAE with zero values, gamma 1, lam 0.95, no whitening: A_t = 0.95^(steps to the end) * score
    adv, step, _ = first_update("gae", n=1)
    want = torch.zeros(4, 3)
    for b, (s, k) in enumerate(zip(SCORES, LENGTHS)):
        for t in range(k):
            want[b, t] = 0.95 ** (k - 1 - t) * s
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(step, want / 8, atol=1e-7, rtol=1e-6)
    # REINFORCE++: every token's return-to-go is its answer's score, whitened over the 8 tokens
    adv, _, mask = first_update("reinforce_pp", n=1)
    tokens = torch.tensor([s for s, k in zip(SCORES, LENGTHS) for _ in range(k)])
    whitened = (tokens - tokens.mean()) / tokens.std()
    torch.testing.assert_close(adv[mask.bool()], whitened, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_agg,weights", [
    ("seq-mean-token-mean", [1 / (4 * k) for k in LENGTHS]),   # each answer counts once: 1/(answers x its length)
    ("seq-mean-token-sum-norm", [1 / (4 * 3)] * 4),            # a constant norm (3 here) for every answer
])
def test_loss_aggregation_changes_the_first_update_as_its_recipe_says(loss_agg, weights):
    _, step, _ = first_update("drgrpo", loss_agg=loss_agg)
    want = by_answer([a * w for a, w in zip(HAND["drgrpo"], weights)])
    torch.testing.assert_close(step, want, atol=1e-7, rtol=1e-6)


# reward functions for the CLI tests below (imported by name: test_estimators:...)
def length_reward(prompts, responses):
    return [float(len(r.split())) for r in responses]


def one_point(prompts, responses):
    return [1.0] * len(responses)


def raises(prompts, responses):
    raise RuntimeError("the grader crashed")


def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)


def not_a_number(prompts, responses):
    return [float("nan")] * len(responses)


def exits(prompts, responses):
    raise SystemExit(0)


def digits(prompts, responses):
    return "1" * len(responses)


def keyed(prompts, responses):
    return {f"answer {i}": 1.0 for i in range(len(responses))}


def huge(prompts, responses):
    return [1e38] * len(responses)


def strings(prompts, responses):
    return ["1.0"] * len(responses)


@pytest.fixture(scope="module")
def through_rm(tiny_run, tmp_path_factory):
    """A copy of the TINY built-in run up to the RM."""
    out = tmp_path_factory.mktemp("estimators") / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("ppo", "ppo_ptx", "report*", "*.png"))
    return out


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_with_the_verifiable_reward_trains_no_value_model(through_rm, tmp_path, tiny, caplog):
    from engine.cli import main

    out = tmp_path / "run"
    shutil.copytree(through_rm, out)
    args = ["ppo", "--out", str(out), *tiny("ppo"), "--ppo.advantage_estimator", "grpo", "--ppo.samples_per_prompt",
            "4", "--ppo.rollout_batch", "4", "--ppo.minibatch", "8", "--ppo.kl_coef", "0", "--ppo.kl_loss_coef",
            "0.04", "--ppo.clip_high", "0.28", "--ppo.loss_agg", "token-mean", "--ppo.drop_constant_groups", "true",
            "--reward.fn", "engine.task.rewards:exact_answer"]
    assert main(args) == 0
    metrics = rows(out / "ppo" / "metrics.jsonl")
    assert len(metrics) == 3 and all("kl_loss" in m and "vf_loss" not in m for m in metrics)
    assert all(m["answers"] == 16 or m["groups_dropped"] > 0 for m in metrics)
    assert {m["score"] for m in metrics} <= {x / 16 for x in range(17)} or all(0 <= m["score"] <= 1 for m in metrics)
    assert (out / "ppo" / "final" / "policy").is_dir() and not (out / "ppo" / "final" / "value").exists()
    ckpt = out / "ppo" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["policy", "trainer.json", "trainer.safetensors"]


def test_rloo_sums_the_reward_model_and_a_function(through_rm, tmp_path, tiny):
    from engine.cli import main

    out = tmp_path / "run"
    shutil.copytree(through_rm, out)
    rm = str(out / "rm" / "final" / "reward")
    base = ["ppo", "--out", str(out), *tiny("ppo"), "--ppo.advantage_estimator", "rloo", "--ppo.samples_per_prompt",
            "2", "--ppo.iterations", "1"]
    assert main(base + ["--reward.fn", "test_estimators:one_point", "--reward.path", rm]) == 0
    with_fn = rows(out / "ppo" / "metrics.jsonl")[0]
    assert main(base + ["--run.overwrite", "true"]) == 0  # the RM alone (the run's, filled in)
    alone = rows(out / "ppo" / "metrics.jsonl")[0]
    # the same answers (same seed): the sum is the RM's score plus the function's one point
    assert with_fn["response_len"] == alone["response_len"]
    assert with_fn["score"] == pytest.approx(alone["score"] + 1.0, abs=1e-5)
    assert main(base + ["--run.overwrite", "true", "--reward.fn", "test_estimators:length_reward"]) == 0
    assert rows(out / "ppo" / "metrics.jsonl")[0]["score"] > 0  # the function alone: word counts


@pytest.mark.parametrize("fn,needle", [
    ("test_estimators:raises", "--reward.fn test_estimators:raises raised RuntimeError: the grader crashed"),
    ("test_estimators:too_few", "returned 7 values for 8 responses"),
    ("test_estimators:not_a_number", "returned nan for response 0"),
    ("test_estimators:exits", "--reward.fn test_estimators:exits raised SystemExit: 0"),
    ("test_estimators:digits", "--reward.fn test_estimators:digits returned a str; it must return a list"),
    ("test_estimators:keyed", "--reward.fn test_estimators:keyed returned a dict; it must return a list"),
    ("test_estimators:huge", "returned 1e+38 for response 0"),
    ("test_estimators:strings", "returned '1.0' (str) for response 0"),
    ("test_estimators:no_such_function", "test_estimators has no function 'no_such_function'"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
])
def test_a_bad_reward_function_is_named(through_rm, tmp_path, tiny, capsys, fn, needle):
    from engine.cli import main

    out = tmp_path / "run"
    shutil.copytree(through_rm, out)
    assert main(["ppo", "--out", str(out), *tiny("ppo"), "--reward.fn", fn]) == 2
    assert needle in capsys.readouterr().err
    assert not (out / "ppo" / "final").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--ppo.advantage_estimator", "ppo2"], "ppo.advantage_estimator must be one of gae, grpo, drgrpo, rloo"),
    (["--ppo.advantage_estimator", "grpo"], "set ppo.samples_per_prompt >= 2 (got 1)"),
    (["--ppo.advantage_estimator", "rloo", "--ppo.samples_per_prompt", "1"], "set ppo.samples_per_prompt >= 2"),
    (["--ppo.samples_per_prompt", "3", "--ppo.minibatch", "36"], "(192 answers) must be a multiple of ppo.minibatch"),
    (["--reward.fn", "nocolon"], "reward.fn must be package.module:function"),
])
def test_bad_estimator_settings_name_the_flag(capsys, tmp_path, flags, needle):
    from engine.cli import main

    assert main(["ppo", "--out", str(tmp_path), *flags]) == 2
    assert needle in capsys.readouterr().err
