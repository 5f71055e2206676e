"""Code a user names on the command line (`package.module:name`, for --reward.fn, --gold.fn, --rollout.env and
--rollout.tools), imported from the user's own environment as named: nothing is loaded from a run directory."""
from __future__ import annotations

import importlib

REWARD_LIMIT = 1e15  # |a reward| such code returns: a batch's sums and squares stay finite in float32 (1e38 overflowed)


def import_named(spec: str, flag: str, form: str = "package.module:function") -> tuple[object, str]:
    """(the module of `spec`, the part after its colon), or a ValueError naming `flag` and saying why not."""
    module_name, sep, names = spec.partition(":")
    if not sep or not module_name or not names.strip(","):
        raise ValueError(f"{flag} {spec!r}: give {form}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{flag} {spec}: cannot import {module_name!r} ({exc}); is it installed or on "
                         f"PYTHONPATH?") from None
    return module, names
