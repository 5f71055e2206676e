"""The kernel suite: which cases `python -m bench` and `pytest bench --benchmark-only` run, at which sizes.

Each bench_<kernel>.py module builds its cases (ours per backend, the naive path, peers) for one size;
a group is one module at one size. Groups are built when their first case runs and dropped when the next
group starts, so only one group's tensors are held at a time.
"""
from __future__ import annotations

import functools

import torch

from . import bench_gae, bench_groups, bench_linear_logprobs, bench_rewards, bench_token_logprobs

SIZES = {  # per kernel: (token log-probs N, V, dtype), (GAE B, T), (rewards B, T), (fused head N, H, V, dtype),
           # (group advantages prompts, n)
    "quick": dict(lp=(64, 1001, torch.float32), gae=(8, 64), rew=(8, 64), lin=(64, 32, 1001, torch.float32),
                  grp=(16, 4)),
    # the fused head at Liger-Kernel's published size (M 8192, H 4096, V 131072) and at the memory target's
    "cuda": dict(lp=(16384, 151936, torch.bfloat16), gae=(256, 2048), rew=(1024, 8192),
                 lin=[(8192, 4096, 131072, torch.bfloat16), (16384, 3584, 151936, torch.bfloat16)], grp=(4096, 16)),
    "cpu": dict(lp=(2048, 32000, torch.float32), gae=(256, 2048), rew=(1024, 8192),
                lin=(4096, 512, 32000, torch.float32), grp=(4096, 16)),
}
KERNELS = {"lp": bench_token_logprobs, "gae": bench_gae, "rew": bench_rewards, "lin": bench_linear_logprobs,
           "grp": bench_groups}


def sizes(size: str, key: str) -> list[tuple]:
    s = SIZES[size][key]
    return s if isinstance(s, list) else [s]


@functools.lru_cache(maxsize=1)
def group(device: str, size: str, key: str, index: int) -> tuple:
    """The cases of kernel `key` at its index-th size (the last group built is kept, the one before freed)."""
    return tuple(KERNELS[key].cases(device, *sizes(size, key)[index]))


def case_ids(device: str, size: str, only: str | None = None) -> list[tuple[str, int, int, str]]:
    """(kernel key, size index, case index, label) of every case, in order."""
    out = []
    for key in KERNELS:
        if only not in (None, key):
            continue
        for i in range(len(sizes(size, key))):
            out += [(key, i, j, c.label) for j, c in enumerate(group(device, size, key, i))]
    group.cache_clear()
    return out
