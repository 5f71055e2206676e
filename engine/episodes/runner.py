"""Episodes of up to `max_turns` turns on any rollout backend: the model's turn generated, the environment
stepped with its text, the environment's messages appended (mask 0), and again, every live episode of the
batch in one `generate` call per turn.

The first turn is the single-turn rollout exactly (one call, n samples per prompt with the prompts' seeds, so
a one-turn environment changes nothing); turn t > 0 of sample j of a prompt samples with a seed derived from
(the prompt's seed, j, t), so an episode depends on its own seed only, not on which others share the batch.
Later turns send the whole episode so far as the prompt: vLLM's prefix cache reuses its KV, and the
transformers backend recomputes it.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

from ..rollout.base import RolloutResult
from ..seeds import derive_seed
from .contain import EnvFailure, Pending, checked_step
from .env import load_env
from .render import TurnRenderer
from .tools import ToolEnvironment, load_tools, parser_of

log = logging.getLogger("engine")


@dataclass
class EpisodeSettings:
    max_turns: int = 4              # the model's turns in an episode
    max_tokens: int = 20            # new tokens per turn
    max_episode_tokens: int = 80    # everything after the prompt: the model's turns and what was appended
    timeout: float = 10.0           # seconds per call into the environment
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


@dataclass
class EpisodeStats:
    turns: int = 0
    reward: float = 0.0                              # the environment's rewards, summed
    turn_rewards: list = field(default_factory=list)  # (index in token_ids of the turn's last token, reward)
    failure: str | None = None                       # an EnvFailure's kind, when the environment failed
    done: bool = False                               # the environment ended it (not a turn or length limit)


@dataclass
class _Live:
    k: int                   # prompt of the call
    j: int                   # sample of the prompt
    env: object
    name: str
    ids: list = field(default_factory=list)
    mask: list = field(default_factory=list)
    lps: list = field(default_factory=list)
    stats: EpisodeStats = field(default_factory=EpisodeStats)
    finish: str = "length"
    over: bool = False


def _fail(ep: _Live, exc: EnvFailure, warned: set) -> None:
    ep.stats.failure, ep.over = exc.kind, True
    if exc.kind not in warned:  # once per kind; every one is counted in the metrics (episodes/env_<kind>)
        log.warning("episode: %s (the episode ends there; counted as episodes/env_%s)", exc, exc.kind)
        warned.add(exc.kind)


def _start(env_cls, prompts, args, n, s: EpisodeSettings, warned: set) -> list[_Live]:
    """One environment per episode, made and reset, all at once (a hanging one costs one timeout, not one per
    episode)."""
    name = getattr(env_cls, "__name__", None) or getattr(getattr(env_cls, "func", None), "__name__", "environment")
    eps = [_Live(k, j, None, name) for k in range(len(prompts)) for j in range(n)]
    make = lambda ep: Pending(env_cls, (), f"{name}()")  # noqa: E731
    reset = lambda ep: Pending(lambda e=ep.env, p=prompts[ep.k], a=args[ep.k]: e.reset(p, **a), (),  # noqa: E731
                               f"{name}.reset")
    for start in (make, reset):
        calls = [(ep, start(ep)) for ep in eps if not ep.over]
        deadline = time.monotonic() + s.timeout
        for ep, call in calls:
            try:
                value = call.result(deadline, s.timeout)
            except EnvFailure as exc:
                _fail(ep, exc, warned)
                continue
            if ep.env is None:
                ep.env = value
    return eps


def run_episodes(engine, env_cls, prompts: list, args: list[dict], prompt_ids: list[list[int]], *, n: int,
                 settings: EpisodeSettings, renderer: TurnRenderer, seeds: list[int],
                 warned: set | None = None) -> list[RolloutResult]:
    """n episodes per prompt (prompt-major, like `generate`): prompts[k] (text or messages) and args[k] (its
    record's "env" object) start an `env_cls()` each; prompt_ids[k] are its tokens. Returns one RolloutResult
    per episode with loss_mask and `episode` (EpisodeStats: its failure's kind, if any) set. warned: the
    failure kinds already logged (each is logged once)."""
    s, warned = settings, warned if warned is not None else set()
    eps = _start(env_cls, prompts, args, n, s, warned)
    tok = renderer.tok
    stops = {tok.eos_token_id}
    for turn in range(s.max_turns):
        live = [ep for ep in eps if not ep.over and len(ep.ids) < s.max_episode_tokens]
        if not live and turn > 0:  # (the first turn is every episode's, as in one generate call)
            break
        gen = dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        if turn == 0:  # every episode at once, n per prompt: the single-turn call (shared prefill)
            out = engine.generate(prompt_ids, n=n, max_tokens=min(s.max_tokens, s.max_episode_tokens),
                                  seeds=seeds, **gen)
            pairs = list(zip(eps, out))
        else:  # one call, each episode its own prompt and seed, the tokens left to it bounding the longest
            out = engine.generate([prompt_ids[ep.k] + ep.ids for ep in live], n=1, max_tokens=min(
                s.max_tokens, max(s.max_episode_tokens - len(ep.ids) for ep in live)),
                seeds=[derive_seed(seeds[ep.k], "turn", ep.j, turn) for ep in live], **gen)
            pairs = list(zip(live, out))
        pending = []
        for ep, r in pairs:
            room = s.max_episode_tokens - len(ep.ids)
            ids, lps = r.token_ids[:room], r.logprobs[:room]
            ep.finish = r.finish_reason if len(ids) == len(r.token_ids) else "length"
            ep.ids += ids
            ep.mask += [1] * len(ids)
            ep.lps += list(lps) + [0.0] * (len(ids) - len(lps))
            ep.stats.turns += 1
            if ep.over:  # the environment failed at its start: the first turn is still the model's
                continue
            reply = tok.decode([t for t in ids if t not in stops], skip_special_tokens=True)
            pending.append((ep, Pending(ep.env.step, (reply,), f"{ep.name}.step")))
        deadline = time.monotonic() + s.timeout
        for ep, call in pending:
            try:
                step = checked_step(call.result(deadline, s.timeout), f"{ep.name}.step")
            except EnvFailure as exc:
                _fail(ep, exc, warned)
                continue
            ep.stats.reward += float(step.reward)
            if step.reward and ep.mask and ep.mask[-1] == 1:  # at the turn's last token (a turn has one)
                ep.stats.turn_rewards.append((len(ep.ids) - 1, float(step.reward)))
            if step.done or turn + 1 == s.max_turns or not step.messages:
                ep.over, ep.stats.done = True, step.done
                continue
            try:
                extra = renderer.ids(step.messages, f"{ep.name}.step")
            except EnvFailure as exc:
                _fail(ep, exc, warned)
                continue
            if len(ep.ids) + len(extra) >= s.max_episode_tokens:  # no room left for the model to answer
                ep.over, ep.finish = True, "length"
                continue
            ep.ids += extra
            ep.mask += [0] * len(extra)
            ep.lps += [0.0] * len(extra)
    return [RolloutResult(ep.k, ep.ids, ep.lps, ep.finish, loss_mask=ep.mask, episode=ep.stats) for ep in eps]


@dataclass
class EpisodeTask:
    """A run's episodes: the environment's class, and for every prompt of the run its record's prompt and
    "env" arguments (aligned with the prompt token ids the trainer holds). Plain data and an importable class:
    it goes to an engine process as it is (--ppo.max_staleness)."""
    env_cls: type
    prompts: list
    args: list
    settings: EpisodeSettings
    renderer: TurnRenderer
    warned: set = field(default_factory=set)

    def run(self, engine, rows: list[int], prompt_ids: list[list[int]], *, n: int, seeds: list[int]):
        """n episodes for each of the run's prompts `rows` (prompt_ids: their tokens), prompt-major."""
        return run_episodes(engine, self.env_cls, [self.prompts[i] for i in rows], [self.args[i] for i in rows],
                            prompt_ids, n=n, settings=self.settings, renderer=self.renderer, seeds=seeds,
                            warned=self.warned)


def episode_task(rcfg, tokenizer, prompts: list, args: list, tools: list | None = None) -> EpisodeTask:
    """A run's EpisodeTask from its rollout settings (engine.config.RolloutConfig: env, tools, max_turns, ...):
    the environment's class loaded from --rollout.env (else the tools' environment for --rollout.tools, which
    allows each prompt the tools its record names: `tools`, a list or None per prompt) and the chat template
    checked for its messages now."""
    settings = EpisodeSettings(rcfg.max_turns, rcfg.max_new_tokens, episode_tokens(rcfg), rcfg.env_timeout,
                               rcfg.temperature, rcfg.top_p, rcfg.top_k)
    env = load_env(rcfg.env) if rcfg.env else functools.partial(ToolEnvironment, load_tools(rcfg.tools),
                                                                parser_of(tokenizer))
    args = [a or {} for a in args]
    if not rcfg.env and tools is not None:
        args = [{**a, "tools": t} if t is not None else a for a, t in zip(args, tools)]
    return EpisodeTask(env, prompts, args, settings, TurnRenderer(tokenizer, rcfg.max_env_tokens))


def episode_tokens(rcfg) -> int:
    """Tokens after the prompt: an episode's (--rollout.max_episode_tokens, or max_turns x max_new_tokens), or
    one answer's without an environment."""
    if not (rcfg.env or rcfg.tools):
        return rcfg.max_new_tokens
    return rcfg.max_episode_tokens or rcfg.max_turns * rcfg.max_new_tokens
