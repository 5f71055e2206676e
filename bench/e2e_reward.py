"""The reward of bench/bench_e2e.py's job, shared by the engine (`--reward.fn bench.e2e_reward:length_reward`,
called as fn(prompts, responses)) and TRL's GRPOTrainer (called with prompts=, completions= and more)."""


def length_reward(prompts, completions=None, **_):
    """An answer's length in words / 10: a reward any policy can move, so both sides train on real signal."""
    return [len(_text(c).split()) / 10 for c in completions]


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return " ".join(m["content"] for m in completion)  # TRL's conversational completions: [{"role", "content"}]
