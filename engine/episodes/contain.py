"""Every call into an environment contained: bounded in time, its result checked, and any failure turned
into an `EnvFailure` that names the environment, the call and what went wrong (the runner ends that episode
there and counts it), never a traceback out of the trainer or a hang.

A call runs in a daemon thread and is waited for `timeout` seconds; one that does not return is abandoned
(Python cannot kill a thread: it goes on in the background, holding nothing of the trainer's, and dies with
the process) and counted as a timeout.
"""
from __future__ import annotations

import math
import numbers
import threading
import time

from ..user_code import REWARD_LIMIT
from .env import Step

ROLES = ("tool", "user", "system")
KINDS = ("raised", "timeout", "malformed", "special_token")  # an EnvFailure's kinds


class EnvFailure(Exception):
    """An environment's call failed. kind: one of KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Pending:
    """One call into an environment, started in its own daemon thread (the episodes of a turn step at once, so
    a tool that waits on I/O does not hold up the others)."""

    def __init__(self, fn, args: tuple, what: str):
        self.what, self.box = what, {}
        self.thread = threading.Thread(target=self._run, args=(fn, args), name=f"env {what}", daemon=True)
        self.thread.start()

    def _run(self, fn, args):
        try:
            self.box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - the user's code: any error is named, SystemExit included
            self.box["error"] = exc

    def result(self, deadline: float, timeout: float):
        """The call's value, waiting until `deadline` (time.monotonic()), or an EnvFailure naming it."""
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            raise EnvFailure("timeout", f"{self.what} did not return within {timeout:g} s (--rollout.env_timeout)")
        if "error" in self.box:
            exc = self.box["error"]
            raise EnvFailure("raised", f"{self.what} raised {type(exc).__name__}: {exc}")
        return self.box.get("value")


def checked_step(out, what: str) -> Step:
    """`out` if it is a well-formed Step (messages of {role: tool|user|system, content: str}, a finite
    reward, a bool done), else an EnvFailure saying what it is instead."""
    if not isinstance(out, Step):
        raise EnvFailure("malformed", f"{what} returned {type(out).__name__}, not engine.episodes.Step")
    if not isinstance(out.messages, list):
        raise EnvFailure("malformed", f"{what} returned messages of type {type(out.messages).__name__}; give a list "
                                      f"of {{'role', 'content'}}")
    for i, m in enumerate(out.messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise EnvFailure("malformed", f"{what} returned messages[{i}] = {str(m)[:80]!r}; each must be "
                                          f"{{'role': one of {ROLES}, 'content': a string}}")
    if isinstance(out.reward, bool) or not isinstance(out.reward, numbers.Real) or not math.isfinite(out.reward) \
            or abs(out.reward) > REWARD_LIMIT:
        raise EnvFailure("malformed", f"{what} returned reward {out.reward!r}; it must be a finite number, at "
                                      f"most {REWARD_LIMIT:g} in magnitude")
    if not isinstance(out.done, bool):
        raise EnvFailure("malformed", f"{what} returned done={out.done!r}; it must be True or False")
    return out
