"""Where an iteration's time goes: wall seconds per named phase, and on a GPU the peak memory allocated in it,
logged with the iteration's metrics as `time/<phase>` and `mem_gib/<phase>`.

On a GPU each phase boundary synchronises the device, so a phase is charged for its own kernels (a handful of
syncs per PPO iteration, whose phases take seconds).
"""
from __future__ import annotations

import contextlib
import time

import torch


class Phases:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
                self.peak_gib[name] = max(self.peak_gib.get(name, 0.0), peak)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """This iteration's `time/<phase>` (and `mem_gib/<phase>`) metrics; the counters start again."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out.update({f"mem_gib/{k}": v for k, v in self.peak_gib.items()})
        self.seconds, self.peak_gib = {}, {}
        return out


def no_phases(name: str):
    """A stand-in for Phases where nobody is timing."""
    return contextlib.nullcontext()
