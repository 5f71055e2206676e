"""The kernel benchmarks run (at --quick sizes: a smoke test, not a measurement): pytest-benchmark over every
case with the harness's figures attached, and `python -m bench` / `python -m bench.bench_<kernel>` printing
their tables from those same measurements."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("token_logprobs fwd", "token_logprobs fwd+bwd", "gae", "shape_rewards k3",
           "linear_token_logprobs fwd+bwd", "group_advantages grpo")


def run(*args):
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_pytest_benchmark_runs_every_case_with_the_harness_figures(tmp_path):
    report = tmp_path / "bench.json"
    run("-m", "pytest", "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider", "--bench-size", "quick",
        f"--benchmark-json={report}")
    benches = json.loads(report.read_text())["benchmarks"]
    kernels = {b["extra_info"]["result"]["kernel"] for b in benches}
    assert kernels == set(KERNELS)
    impls = {(b["extra_info"]["result"]["kernel"], b["extra_info"]["result"]["impl"]) for b in benches}
    assert ("token_logprobs fwd", "ours (torch)") in impls and ("gae", "per-timestep Python loop (TRL-style)") in impls
    for b in benches:
        info, stats = b["extra_info"], b["stats"]
        assert stats["rounds"] >= 5 and stats["median"] > 0
        assert abs(info["result"]["median_ms"] - stats["median"] * 1e3) < 1e-6  # the table's median is pytest's
        if info["result"]["kernel"] != "linear_token_logprobs fwd+bwd":
            assert info["bytes"] > 0 and 0 < info["frac_copy_bw"] and info["copy_bw_gbps"] > 0
        else:
            assert info["tflops"] > 0 and info["matmul_peak_tflops"] > 0
    assert json.loads(report.read_text())["machine_info"]["copy_bandwidth_gbps"] > 0


def test_one_kernel_alone_prints_only_its_rows():
    """`python -m bench --quick` (every kernel) runs in the GPU kit's dry run (tests/test_gpu_kit.py), which
    checks its table; here one kernel's own entry point."""
    one = run("-m", "bench.bench_rewards", "--quick")
    rows = [line for line in one.splitlines() if line.startswith("| ") and "---" not in line and "kernel |" not in line]
    assert rows and all(line.startswith("| shape_rewards k3 |") for line in rows), one[-2000:]
    assert "saved" not in one


def test_the_whole_job_benchmark_runs_both_sides():
    """bench/bench_e2e.py's dry run: the engine and TRL's GRPOTrainer each train the same tiny job, A B."""
    out = run("-m", "bench.bench_e2e", "--dry-run")
    assert "| 1 |" in out and "Median per-pair ratio" in out and "generate" in out


def test_the_dpo_benchmark_runs_both_sides_on_the_same_tokens():
    """bench/bench_dpo.py's dry run: the engine and TRL's DPOTrainer each train the same tiny DPO job, A B, on
    the same number of tokens per pair."""
    out = run("-m", "bench.bench_dpo", "--dry-run")
    assert "| 1 |" in out and "Median per-pair ratio" in out
    engine, trl = (int(x) for x in out.split("tokens per pair in the engine and ")[0].split()[-1:] +
                   out.split("tokens per pair in the engine and ")[1].split()[:1])
    assert engine == trl > 0


def test_the_critic_benchmark_runs_ppo_beside_grpo():
    """bench/bench_e2e.py --critic's dry run: the engine's PPO with a value model beside its GRPO, A B."""
    out = run("-m", "bench.bench_e2e", "--critic", "--dry-run")
    assert "| 1 |" in out and "PPO's iteration over GRPO's" in out and "values" in out
