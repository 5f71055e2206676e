"""Benchmarks: `python -m bench` (kernels), `python -m bench.bench_rollout`, `python -m bench.bench_linear_logprobs`."""
