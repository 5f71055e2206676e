"""The environment protocol: what the model talks to in an episode.

An environment is a class with no required constructor arguments; the runner makes one per episode and calls

    reset(prompt, **args)  once: `prompt` is the record's prompt (text or chat messages, what the model was
                           shown), `args` the record's "env" object (e.g. the answer a tool knows);
    step(reply) -> Step    after each of the model's turns: `reply` is the turn's text (up to its end token).

`Step.messages` are appended to the conversation (role "tool" for a tool's result, "user" for a user's next
turn) and the model answers them in its next turn, unless `done`. `Step.reward` is that turn's reward (the
episode's reward is their sum, added to the reward model's and reward function's score of the episode).

    class Lookup:
        def reset(self, prompt, secret="blue"):
            self.secret = secret
        def step(self, reply):
            if reply.startswith("lookup"):
                return Step([{"role": "tool", "content": self.secret}])
            return Step(reward=float(self.secret in reply), done=True)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Protocol

from ..user_code import import_named


@dataclass
class Step:
    messages: list = field(default_factory=list)  # [{"role", "content"}] appended for the model's next turn
    reward: float = 0.0                           # this turn's reward
    done: bool = False                            # the episode ends after this turn


class Environment(Protocol):
    def reset(self, prompt, **args) -> None: ...

    def step(self, reply: str) -> Step: ...


def load_env(spec: str, flag: str = "--rollout.env") -> type:
    """The class `spec` ("package.module:Class") names, checked to have reset and step, or a ValueError
    saying why not. Imported from the user's environment as named: nothing is loaded from a run directory."""
    module, name = import_named(spec, flag, "package.module:Class")
    cls = getattr(module, name, None)
    if not inspect.isclass(cls):
        raise ValueError(f"{flag} {spec}: {module.__name__} has no class {name!r}")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"{flag} {spec}: {name} has no {' or '.join(missing)} method (an environment has "
                         f"reset(prompt, **args) and step(reply) -> engine.episodes.Step)")
    try:
        inspect.signature(cls).bind()
    except TypeError:
        raise ValueError(f"{flag} {spec}: {name}() needs constructor arguments; an environment is made with "
                         f"none (per-prompt arguments go to reset, from the prompt record's \"env\" object)") from None
    return cls
