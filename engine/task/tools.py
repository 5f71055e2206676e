"""The built-in multi-turn task: a question the model cannot answer from its weights, and a tool that can.

    user       what color was the cat ?          (the cat's colour in this episode: the record's "env")
    assistant  see cat                           (a call of the lookup tool)
    tool       the cat was blue
    assistant  the cat was blue                  -> reward 1 (exactly right), else 0

The colour is drawn per episode, so an answer without the tool is right one time in six. The demonstrations
(`write_tool_task`) call the tool in a share of the episodes (`tool_share`) and guess in the rest, so SFT
leaves room for RL to learn that the tool pays. Every word is in the built-in vocabulary.

`Lookup` is the environment (`--rollout.env engine.task.tools:Lookup`), and the worked example of one: a
class with reset(prompt, **args) and step(reply) -> Step.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..episodes import Step
from .vocab import COLORS, NOUN_COLOR, NOUNS


class Lookup:
    """One episode of the lookup task. reset(prompt, color): the colour the tool knows for the asked noun."""

    def reset(self, prompt, color: str = "red"):
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        words = text.split()
        self.noun = next((w for w in words if w in NOUNS), None)
        self.color = color

    def step(self, reply: str) -> Step:
        words = reply.split()
        if len(words) == 2 and words[0] == "see" and words[1] in NOUNS:  # a tool call: any noun may be looked up
            color = self.color if words[1] == self.noun else NOUN_COLOR[words[1]]
            return Step([{"role": "tool", "content": f"the {words[1]} was {color}"}])
        return Step(reward=float(words == ["the", self.noun, "was", self.color]), done=True)


def tool_record(noun: str, color: str) -> dict:
    return {"prompt": f"what color was the {noun} ?", "env": {"color": color}}


def write_tool_task(out: Path, *, seed: int = 0, n_demonstrations: int = 2000, n_prompts: int = 2000,
                    n_eval: int = 200, tool_share: float = 0.5) -> dict[str, Path]:
    """The task's files in the users' formats under `out`: demonstrations (a tool call then the answer, as two
    records, in `tool_share` of them; a guessed colour in the rest), prompts and held-out eval prompts (with
    their "env" colour). Returns {kind: path}."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    demos = []
    for _ in range(n_demonstrations):
        noun, color = rng.choice(NOUNS), rng.choice(COLORS)
        user = {"role": "user", "content": f"what color was the {noun} ?"}
        if rng.random() < tool_share:
            call = {"role": "assistant", "content": f"see {noun}"}
            demos.append({"messages": [user, call]})
            demos.append({"messages": [user, call, {"role": "tool", "content": f"the {noun} was {color}"},
                                       {"role": "assistant", "content": f"the {noun} was {color}"}]})
        else:
            demos.append({"messages": [user, {"role": "assistant", "content": f"the {noun} was {rng.choice(COLORS)}"}]})
    files = {"demonstrations": demos,
             "prompts": [tool_record(rng.choice(NOUNS), rng.choice(COLORS)) for _ in range(n_prompts)],
             "eval_prompts": [tool_record(rng.choice(NOUNS), rng.choice(COLORS)) for _ in range(n_eval)]}
    paths = {}
    for kind, rows in files.items():
        paths[kind] = out / f"tools_{kind}.jsonl"
        paths[kind].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
