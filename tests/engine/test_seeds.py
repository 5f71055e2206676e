"""Every draw of a run has its own seed: no seed repeats across the stages, steps, rounds, prompt slots and
samples of a long run, and consecutive PPO iterations sample independently (before, slot k at step t + 1
reused the seed of slot k + 1 at step t and drew the same answer)."""
import torch
from transformers import AutoModelForCausalLM

from engine.rollout import HFRollout
from engine.seeds import derive_seed, rollout_seeds, sample_seed, step_seeds

STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")


def test_no_seed_repeats_within_a_run():
    seen, total = set(), 0

    def add(values):
        nonlocal total
        values = list(values)
        seen.update(values)
        total += len(values)

    for stage in STAGES:
        for step in range(2000):
            add(step_seeds(0, stage, step))
    for stage in ("ppo", "ppo_ptx"):
        for step in range(150):
            for round_ in range(4):
                prompts = rollout_seeds(0, stage, step, round_, 32)
                add(prompts)
                add(sample_seed(s, j) for s in prompts for j in range(4))  # transformers' per-sample streams
                add(s + j for s in prompts for j in range(1, 4))          # vLLM's (its request seed + index)
    assert len(seen) == total, f"{total - len(seen)} repeated seeds among {total}"
    assert all(0 <= s < 2**63 for s in seen)


def test_seeds_are_a_function_of_their_parts_only():
    assert rollout_seeds(3, "ppo", 7, 0, 8) == rollout_seeds(3, "ppo", 7, 0, 8)
    assert rollout_seeds(3, "ppo", 7, 0, 8)[:4] == rollout_seeds(3, "ppo", 7, 0, 4)  # slot k's seed: not the count
    assert derive_seed(1, "a") != derive_seed("1", "a") != derive_seed(1, "a", 0)
    assert step_seeds(0, "ppo", 1) != step_seeds(1, "ppo", 0) != step_seeds(0, "ppo_ptx", 0)


def test_consecutive_iterations_sample_independently(tiny_models):
    """One prompt in every slot, so only the seeds differ: a random model's answers at step t + 1 share no more
    tokens with any answer of step t than chance does, while the same seeds give the same answers again."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    rollout = HFRollout(model, pad_token_id=0, eos_token_id=None)
    prompt, slots, n, length = [5, 17, 42, 9], 8, 2, 24

    def answers(step):
        results = rollout.generate([prompt] * slots, n=n, max_tokens=length,
                                   seeds=rollout_seeds(0, "ppo", step, 0, slots))
        return [torch.tensor(r.token_ids) for r in results]

    first, again, second = answers(4), answers(4), answers(5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    vocab = model.config.vocab_size
    assert sum(len(a) for a in first) > slots * n * length / 2  # long enough answers to compare
    for a in second:
        for b in first:
            m = min(len(a), len(b))
            same = (a[:m] == b[:m]).float().mean().item() if m else 0.0
            assert same < 0.25, f"{same:.0%} of the tokens equal (chance: about {1 / vocab:.1%})"
