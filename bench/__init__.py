"""Benchmarks: `python -m bench` (kernels), `python -m bench.bench_rollout`, `python -m bench.bench_linear_logprobs`."""
import os

# As the engine's CLI does (engine/cli.py): torch's CPU tensors of 2 MiB and more on transparent huge pages,
# for every implementation measured here alike. THP_MEM_ALLOC_ENABLE=0 measures without them.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
