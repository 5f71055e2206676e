"""The benchmark entry points run and print their tables (at --quick sizes: a smoke test, not a measurement)."""
import runpy
import sys

import pytest


@pytest.mark.parametrize("module,kernel", [
    ("bench_token_logprobs", "token_logprobs"), ("bench_gae", "gae"), ("bench_rewards", "shape_rewards"),
    ("bench_linear_logprobs", "linear_token_logprobs fwd+bwd"), ("bench_groups", "group_advantages grpo"),
])
def test_each_kernel_benchmark_runs_alone_and_prints_its_rows(module, kernel, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"bench/{module}.py", "--quick"])
    monkeypatch.delitem(sys.modules, f"bench.{module}", raising=False)  # as a fresh `python -m` would find it
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(f"bench.{module}", run_name="__main__")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(f"| {kernel}")]
    assert rows, out
    assert "saved" not in out  # one kernel's rows are never saved over the full record
