"""Every kernel case on pytest-benchmark: ours per backend, the naive path, peers (bench/suite.py).

    pytest bench --benchmark-only [--bench-device cuda] [--bench-size quick] [--bench-only rew]
    pytest bench --benchmark-only --benchmark-autosave      # keep this commit's numbers in .benchmarks/
    pytest bench --benchmark-only --benchmark-compare       # ... and compare with the last kept run

Each case runs `rounds_for` calls (a 2 s budget, 5 to 200) after 2 warm-up calls; on CUDA every call ends
with a synchronize (the launch is not what is timed) and each round starts with a 256 MiB write that
flushes L2. extra_info holds the harness's figures for the case: bytes, GB/s, fraction of the copy bandwidth
measured in the same session, 20th/80th percentiles, peak extra memory, TFLOP/s where FLOPs are known;
`python -m bench` prints and saves its tables from exactly these.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from . import suite
from .harness import peak_extra_mb, rounds_for, summarize, sync


def test_kernel(benchmark, case_id, bench_device, bench_size, copy_bw):
    key, size_index, index, _ = case_id
    case = suite.group(bench_device, bench_size, key, size_index)[index]
    flush = torch.empty(64 * 2**20, device=bench_device) if bench_device == "cuda" else None

    def timed():
        out = case.fn()
        sync(bench_device)
        return out

    def setup():
        if flush is not None:
            flush.zero_()
            sync(bench_device)

    rounds = rounds_for(timed, bench_device)
    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=2, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the case ran once, nothing measured
        return
    times_ms = [t * 1e3 for t in benchmark.stats.stats.data]
    result = summarize(case, times_ms, copy_bw, peak_extra_mb(case.fn, bench_device))
    benchmark.extra_info.update(result=asdict(result), bytes=case.nbytes, gbps=result.gbps,
                                frac_copy_bw=result.frac_copy_bw, copy_bw_gbps=copy_bw,
                                peak_extra_mb=result.peak_extra_mb, **result.extra)
