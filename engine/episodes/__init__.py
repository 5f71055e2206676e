"""Episodes: a rollout of several turns, the model talking to an environment (tools, a simulated user, a
game), trained on its own tokens only.

- `env`: the protocol an environment implements (`reset`, `step` -> `Step`) and how one is loaded from
  `--rollout.env package.module:Class`;
- `contain`: every call into an environment bounded in time and checked, its failures named and counted;
- `render`: the environment's messages as token ids appended after the model's own (the chat template's
  rendering of just those messages, never a re-tokenisation of the whole conversation);
- `runner`: the turns, on any rollout backend (`engine.rollout`'s protocol);
- `tools`: plain functions as tools (`--rollout.tools`), their schemas in the prompt, and the environment that
  runs the model's calls.

Above the rollout backends (it drives one), below the trainers, which call `EpisodeTask.run` in place of one
`generate` call (in the engine's process with --ppo.max_staleness). Never imports the built-in task.
"""
from .env import Environment, Step, load_env
from .runner import EpisodeSettings, EpisodeTask, episode_task, episode_tokens, run_episodes

__all__ = ["Environment", "Step", "load_env", "EpisodeSettings", "EpisodeTask", "episode_task", "episode_tokens",
           "run_episodes"]
