"""No pass that cannot change the result (issue 26): with KL 0 the reference is neither loaded nor run; an
on-policy update takes its old log-probs from its own forward; the transformers backend prefills each prompt
once for its n samples. Each is checked against the full computation on the same job."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from engine.rollout import HFRollout
from engine.task.tiny_checkpoint import FAMILIES
from engine.trainers.passes import old_logprobs_source

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job(tiny_models, tmp_path_factory):
    """A GRPO job on the tiny Llama with a reward function (bench/bench_e2e.py's, at a tiny size)."""
    work = tmp_path_factory.mktemp("passes")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["Name three primary colors.", "What is 17 times 3?", "Count to five.",
                                "Write a haiku about the sea."] * 2))
    base = ["ppo", "--policy.path", tiny_models["llama"], "--data.prompts", prompts, "--reward.fn",
            "bench.e2e_reward:length_reward", "--ppo.advantage_estimator", "grpo", "--ppo.samples_per_prompt", "4",
            "--ppo.rollout_batch", "4", "--ppo.minibatch", "16", "--ppo.epochs", "1", "--ppo.kl_coef", "0",
            "--ppo.lr", "1e-4", "--ppo.iterations", "3", "--ppo.checkpoint_every", "3", "--rollout.max_new_tokens",
            "12", "--run.progress", "false"]

    def run(name, *extra, procs=1):
        out = work / name
        launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node", str(procs)]
        done = subprocess.run([*launch, "-m", "engine", *map(str, base), "--out", str(out), *extra], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
        return rows, load_file(out / "ppo" / "final" / "policy" / "model.safetensors")
    return run


def same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def shared(rows_a, rows_b, *, skip=()):
    for a, b in zip(rows_a, rows_b):
        for k in a:
            if k in b and not k.startswith("time/") and k not in skip:
                assert a[k] == b[k], (k, a[k], b[k])


def test_with_kl_0_the_reference_is_skipped_and_changes_nothing(job):
    lean, w_lean = job("lean")
    full, w_full = job("with-reference", "--ppo.log_kl", "true", "--ppo.old_logprobs", "trainer")
    same_weights(w_lean, w_full)
    shared(lean, full)
    assert all("time/ref_logprobs" not in r and "time/logprobs" not in r and "kl" not in r for r in lean)
    assert all("time/ref_logprobs" in r and "time/logprobs" in r and "kl" in r for r in full)
    assert full[0]["kl"] == 0.0  # before the first update the policy is the reference


def test_on_policy_old_logprobs_from_the_update_equal_a_recomputed_pass(job, tiny_models):
    reused, w_reused = job("reused")
    recomputed, w_recomputed = job("recomputed", "--ppo.old_logprobs", "trainer")
    same_weights(w_reused, w_recomputed)
    shared(reused, recomputed)
    assert all(r["logprob_diff_max"] < 1e-4 for r in reused)  # engine vs trainer, measured on the update's pass
    from_engine, w_engine = job("engine", "--ppo.old_logprobs", "engine")
    assert all("logprob_diff_max" not in r for r in from_engine)
    # The engine's log-probs of its samples differ from the trainer's by the rounding measured above, so the
    # two runs' updates differ by what that rounding moves: Adam's first steps are the gradient's sign, and an
    # element whose gradient is about 0 may flip, however small the difference. Compared as whole updates
    # (from the same start): the same direction and size, not the same bits.
    start = load_file(Path(tiny_models["llama"]) / "model.safetensors")
    d_reused = torch.cat([(w_reused[k] - start[k]).flatten().double() for k in sorted(w_reused)])
    d_engine = torch.cat([(w_engine[k] - start[k]).flatten().double() for k in sorted(w_reused)])
    assert d_reused.norm() > 0
    assert (d_engine - d_reused).norm() / d_reused.norm() < 0.05


def test_the_update_s_own_old_logprobs_on_two_processes_match_one(job):
    """Each process keeps its rows' log-probs from the update; the metrics see all rows (summed across)."""
    one, w_one = job("one")
    two, w_two = job("two", procs=2)
    same_weights(w_one, w_two, atol=1e-4 * 0.05)  # 5% of one step (lr 1e-4): only float32 sum order differs
    for a, b in zip(one, two):
        for k in ("score", "pg_loss", "entropy", "logprob_diff_mean", "response_len"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k


def test_which_old_logprobs_each_configuration_uses():
    from engine.config import PPOConfig

    def source(**kw):
        return old_logprobs_source(PPOConfig(**{"rollout_batch": 4, "samples_per_prompt": 4, "minibatch": 16,
                                                "epochs": 1, "kl_coef": 0.0, **kw}))
    assert source() == "update"
    assert source(epochs=2) == "trainer"               # the second epoch's ratio is to the sampling policy
    assert source(minibatch=8) == "trainer"            # the second minibatch starts from an updated policy
    assert source(kl_coef=0.1) == "trainer"            # the KL penalty in the reward reads them before
    assert source(adaptive_kl=True) == "trainer"
    assert source(old_logprobs="engine") == "engine" and source(old_logprobs="trainer") == "trainer"


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefill_samples_what_generate_samples(tiny_models, family):
    """Each prompt's KV cache computed once and repeated for its n samples: the same tokens as prefilling every
    row, and their log-probs to float32 rounding (a different batch shape of the same matmuls)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family])
    prompts = [[5, 17, 42, 9, 11], [7, 3], [8, 8, 8, 30, 31, 32, 33], [12]]
    seeds = [11, 12, 13, 14]
    kw = dict(pad_token_id=0, eos_token_id=model.config.eos_token_id)
    got = HFRollout(model, **kw).generate(prompts, n=3, max_tokens=10, seeds=seeds)
    want = HFRollout(model, share_prefill=False, **kw).generate(prompts, n=3, max_tokens=10, seeds=seeds)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
