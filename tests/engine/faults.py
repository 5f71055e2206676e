"""A reward function (`--reward.fn faults:zero_reward`) for the multi-process tests: it adds nothing to the
RM's scores, and, when RLHF_TEST_FAIL_CALL=N is set, raises on its N-th call in the process of rank
RLHF_TEST_FAIL_RANK: a bug in user code that hits one rank only. With RLHF_TEST_KILL=1 that process is
killed instead (SIGKILL, as the kernel's OOM killer or a lost node would end it)."""
import os
import signal

_calls = {"n": 0}


def zero_reward(prompts, responses):
    _calls["n"] += 1
    fail_at = int(os.environ.get("RLHF_TEST_FAIL_CALL", "0"))
    if fail_at and _calls["n"] == fail_at and os.environ.get("RANK") == os.environ.get("RLHF_TEST_FAIL_RANK", "1"):
        if os.environ.get("RLHF_TEST_KILL") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure on rank {os.environ['RANK']} at call {fail_at}")
    return [0.0] * len(responses)
