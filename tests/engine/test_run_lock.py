"""One run per directory, with real processes: a second start on a live run's --out (and a resume beside it) is
refused naming the holder and changes nothing; the live run finishes untouched; a lock whose process was
killed is taken over; under torchrun the main rank holds it and the job says so once."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.rundir.run_lock import LOCK_NAME, RunLockedError, acquire, release

ROOT = Path(__file__).resolve().parents[2]


def engine(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", *map(str, argv)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def holder(out: Path, pid: int, timeout: float = 120) -> dict:
    """Wait until `pid` holds out's lock (its details written); returns them."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            info = json.loads((out / LOCK_NAME).read_text() or "{}")
            if info.get("pid") == pid:
                return info
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never took the lock of {out}")


@pytest.fixture
def before_sft(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("sft", "rm", "ppo", "ppo_ptx", "report*", "*.png",
                                                                 "samples.json"))
    return out


def test_a_second_run_and_a_resume_beside_a_live_run_are_refused_and_change_nothing(before_sft, tiny):
    out = before_sft
    flags = ["--out", out, *tiny("sft")]
    live = engine("sft", *flags)
    try:
        info = holder(out, live.pid)
        os.kill(live.pid, signal.SIGSTOP)  # frozen while it holds the directory: the others start meanwhile
        listing = sorted(p.relative_to(out) for p in out.rglob("*"))
        for extra in ([], ["--run.resume", "true"], ["--run.overwrite", "true"]):
            second = engine("sft", *flags, *extra)
            _, err = second.communicate(timeout=300)
            assert second.returncode == 2, err[-2000:]
            assert f"error: {out} is in use by another run (pid {live.pid} on {info['host']}" in err, err[-2000:]
            assert "One run per directory" in err
            assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing  # nothing made or removed
    finally:
        os.kill(live.pid, signal.SIGCONT)
    _, err = live.communicate(timeout=300)
    assert live.returncode == 0, err[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps  # one run's rows, once each
    assert not (out / LOCK_NAME).exists()  # a finished run leaves no lock


def test_the_lock_of_a_killed_run_is_taken_over(before_sft, tiny):
    out = before_sft
    flags = ["--out", out, *tiny("sft")]
    dead = engine("sft", *flags)
    holder(out, dead.pid)
    dead.kill()  # kill -9: the file stays, the kernel's lock goes with the process
    dead.communicate(timeout=60)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == dead.pid
    resumed = engine("sft", *flags, "--run.resume", "true")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"taking over the lock of pid {dead.pid}" in err and "which is no longer running" in err
    assert (out / "sft" / "final" / "policy" / "model.safetensors").is_file()


def test_lock_is_exclusive_between_processes_and_never_through_a_link(tmp_path):
    out = tmp_path / "run"
    fd = acquire(out, "test")
    probe = "from pathlib import Path; from engine.rundir.run_lock import acquire; acquire(Path(%r), 'probe')" % str(out)
    other = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert other.returncode != 0 and "RunLockedError" in other.stderr and f"pid {os.getpid()}" in other.stderr
    release(out, fd)
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
                          ).returncode == 0
    (out / LOCK_NAME).unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("keep")
    (out / LOCK_NAME).symlink_to(elsewhere)
    with pytest.raises(RunLockedError, match="symbolic link"):
        acquire(out, "test")
    assert elsewhere.read_text() == "keep"


def test_under_torchrun_the_main_rank_holds_the_lock_and_a_refusal_is_said_once(before_sft, tiny):
    out = before_sft
    fd = acquire(out, "a live run")
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "engine", "sft", "--out", str(out), *tiny("sft")]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        release(out, fd)
    text = done.stdout + done.stderr
    assert done.returncode != 0
    assert text.count(f"is in use by another run (pid {os.getpid()}") == 1, text[-3000:]
    assert not (out / "sft").exists()
