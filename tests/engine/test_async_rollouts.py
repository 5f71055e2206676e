"""--ppo.max_staleness k: the rollout engine in a process of its own, through the real CLI (the engine process
is real: spawned, fed through shared memory, killed for real in the crash test)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def _prepare(run_dir, path):
    shutil.copytree(run_dir, path, ignore=shutil.ignore_patterns("ppo", "ppo_ptx"))
    return path


def _rows(out, stage="ppo"):
    return [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]


def _weights(out, stage="ppo"):
    return load_file(out / stage / "final" / "policy" / "model.safetensors")


def _flags(tiny, *extra, ptx=False):
    return [*tiny("ppo", ptx=ptx), *(["--ptx", "true"] if ptx else []), "--ppo.iterations", "5",
            "--ppo.eval_every", "0", *extra]


@pytest.mark.parametrize("k, correction, cores", [(1, "decoupled", "split"), (2, "tis", "shared"),
                                                   (1, "tis", "follow")])
def test_every_batch_is_k_versions_old_at_most_and_exactly_the_schedule(run_dir, tmp_path, tiny, k, correction,
                                                                        cores):
    import os

    before = os.sched_getaffinity(0), torch.get_num_threads()
    out = _prepare(run_dir, tmp_path / "run")
    assert main(["ppo", "--out", str(out), *_flags(tiny, "--ppo.max_staleness", str(k), "--ppo.off_policy_correction",
                                                    correction, "--rollout.engine_cores", cores)]) == 0
    assert (os.sched_getaffinity(0), torch.get_num_threads()) == before  # the trainer's cores given back
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        trained = r["step"] - 1                         # iteration t trains on batch t
        assert r["policy_version"] == max(trained - k, 0)
        assert r["staleness"] == trained - r["policy_version"] <= k
        # the correction ran and says how far the engine's policy was: weights near 1 on a tiny model
        assert 0 < r["is_ess"] <= 1 and r["is_weight_max"] >= r["is_weight_mean"] > 0
    assert any(r["staleness"] == k for r in rows)
    assert all(torch.isfinite(t).all() for t in _weights(out).values())


def test_k0_is_the_synchronous_loop(run_dir, tmp_path, tiny):
    a, b = _prepare(run_dir, tmp_path / "a"), _prepare(run_dir, tmp_path / "b")
    assert main(["ppo", "--out", str(a), *_flags(tiny)]) == 0
    assert main(["ppo", "--out", str(b), *_flags(tiny, "--ppo.max_staleness", "0")]) == 0
    ra, rb = _rows(a), _rows(b)
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [drop(r) for r in ra] == [drop(r) for r in rb]
    assert "staleness" not in ra[0] and "time/generate" in ra[0]  # no engine process: generated in the loop
    wa, wb = _weights(a), _weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)


@pytest.mark.parametrize("stage, cores", [("ppo", "shared"), ("ppo_ptx", "shared"), ("ppo", "follow")])
def test_resume_after_ctrl_c_matches_uninterrupted(run_dir, tmp_path, tiny, monkeypatch, interrupt, stage, cores,
                                                   capsys):
    """Bit for bit with shared (and split) cores; with follow, to float32 rounding (a block's thread count
    depends on timing, and CPU reductions round differently on 1 and 2 threads). Kept batches changed in
    trainer.json are refused before the first step (every kind: tests/engine/test_async_pending.py)."""
    import engine.trainers.ppo as ppo

    flags = _flags(tiny, "--ppo.max_staleness", "2", "--ppo.checkpoint_every", "2", "--rollout.engine_cores", cores,
                   ptx=stage == "ppo_ptx")
    straight = _prepare(run_dir, tmp_path / "straight")
    assert main(["ppo", "--out", str(straight), *flags]) == 0
    broken = _prepare(run_dir, tmp_path / "broken")
    with monkeypatch.context() as m:
        interrupt(m, ppo, "make_experience", 4)  # during iteration 4 of 5: batches 2 and 3 were generated early
        assert main(["ppo", "--out", str(broken), *flags]) == 130
    assert (broken / stage / "checkpoints" / "latest").read_text() == "step-000002"
    state = json.loads((broken / stage / "checkpoints" / "step-000002" / "trainer.json").read_text())["state"]
    assert [(p["batch"], p["version"]) for p in state["async_pending"]] == [(2, 0), (3, 1)]
    if stage == "ppo" and cores == "shared":
        _tampered_batches_are_refused(broken, stage, flags, capsys)
    assert main(["ppo", "--out", str(broken), "--run.resume", "true", *flags]) == 0
    a, b = _weights(straight, stage), _weights(broken, stage)
    exact = dict(rtol=0, atol=0) if cores == "shared" else {}
    for name in a:
        torch.testing.assert_close(a[name], b[name], **exact, msg=name)
    keep = ("score", "loss", "policy_version", "staleness", "is_ess")
    ra, rb = ([{k: r[k] for k in keep} for r in _rows(run, stage)] for run in (straight, broken))
    if cores == "shared":
        assert ra == rb
    else:
        assert [(r["policy_version"], r["staleness"], r["score"]) for r in ra] == \
               [(r["policy_version"], r["staleness"], r["score"]) for r in rb]
        torch.testing.assert_close(torch.tensor([[r["loss"], r["is_ess"]] for r in ra]),
                                   torch.tensor([[r["loss"], r["is_ess"]] for r in rb]))


def _tampered_batches_are_refused(out, stage, flags, capsys):
    """A token outside the vocabulary (every other kind: test_async_pending.py): the resume ends with exit 2 and
    one message naming trainer.json's field; the run directory is left as it was."""
    path = out / stage / "checkpoints" / "step-000002" / "trainer.json"
    original = path.read_bytes()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for edit, says in ((lambda b: b[1]["results"][0][1].__setitem__(0, 2**70),
                        f"async_pending[1].results[0]: token id {2**70} is outside"),):
        doc = json.loads(original)
        edit(doc["state"]["async_pending"])
        path.write_text(json.dumps(doc))
        capsys.readouterr()
        assert main(["ppo", "--out", str(out), "--run.resume", "true", *flags]) == 2
        err = capsys.readouterr().err
        assert f"{path}: {says}" in err and "Traceback" not in err, err[-2000:]
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    path.write_bytes(original)


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def test_a_killed_engine_process_ends_the_run_with_one_message_and_keeps_the_checkpoint(run_dir, tmp_path, tiny):
    from flag_bundles import only_for

    out = _prepare(run_dir, tmp_path / "run")
    flags = only_for("ppo", [*tiny("ppo"), "--ppo.iterations", "400", "--ppo.eval_every", "0",
                             "--ppo.checkpoint_every", "2", "--ppo.max_staleness", "1"])
    proc = subprocess.Popen([sys.executable, "-m", "engine", "ppo", "--out", str(out), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "ppo" / "checkpoints" / "latest").exists():  # running, a checkpoint written
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        engines = [p for p in _children(proc.pid) if "spawn" in open(f"/proc/{p}/cmdline").read()]
        assert len(engines) == 1
        os.kill(engines[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 5
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "rollout engine process" in lines[0] and "-9" in lines[0], err[-2000:]
    assert "--run.resume true" in lines[0] and "Traceback" not in err
    latest = (out / "ppo" / "checkpoints" / "latest").read_text()
    assert (out / "ppo" / "checkpoints" / latest / "trainer.json").is_file()
    assert not (out / "ppo" / "final").exists()


@pytest.mark.parametrize("flag, says", [
    (["--ppo.drop_constant_groups", "true", "--ppo.samples_per_prompt", "2", "--ppo.minibatch", "8"],
     "drop_constant_groups"),
    (["--ppo.old_logprobs", "engine"], "old_logprobs engine"),
])
def test_what_async_does_not_support_is_refused_by_name(run_dir, tmp_path, tiny, flag, says, capsys):
    out = _prepare(run_dir, tmp_path / "run")
    assert main(["ppo", "--out", str(out), *_flags(tiny, "--ppo.max_staleness", "1", *flag)]) == 2
    assert says in capsys.readouterr().err


def test_a_staleness_past_16_is_refused_before_anything_starts(tmp_path, capsys):
    assert main(["ppo", "--out", str(tmp_path / "run"), "--ppo.max_staleness", "1000"]) == 2
    assert "ppo.max_staleness must be at most 16, got 1000" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _engine(tiny_models, tokens: int):
    from transformers import AutoTokenizer

    from engine.rollout.async_engine import AsyncRollout, EngineSpec

    model = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(model)
    spec = EngineSpec("hf", str(model), 0, tok.pad_token_id, tok.eos_token_id, "float32", 512, 4, tokens, cores=(0,))
    weights = load_file(os.path.join(model, "model.safetensors"))
    return AsyncRollout(spec, weights.items(), slots=1)


def test_an_engine_killed_half_way_through_a_large_answer_is_seen_within_seconds(tiny_models):
    """The answer (32 prompts x 4 samples x up to 256 tokens: hundreds of KiB) is larger than the pipe's
    64 KiB buffer, which the trainer does not read while it trains: the engine blocks half-way through writing
    it. Killed there, the trainer's wait ends with EngineProcessDied (it used to block for the rest of the
    message forever: the trainer held the pipe's write end too, so no end of file ever came)."""
    import threading

    from engine.rollout.async_engine import EngineProcessDied

    engine = _engine(tiny_models, 256)
    try:
        engine.submit(0, [[5 + i, 17, 42, 9] for i in range(32)], list(range(32)), 0)
        deadline = time.time() + 120
        while not (engine.answers.poll(0.1) and engine.busy[0] == 0):  # answered: part of it in the pipe
            assert engine.proc.is_alive() and time.time() < deadline
        time.sleep(0.5)
        assert engine.proc.is_alive()  # its sender blocked on the full pipe
        os.kill(engine.proc.pid, signal.SIGKILL)
        seen = []

        def wait():
            try:
                engine.result(0)
            except EngineProcessDied as exc:
                seen.append(str(exc))
        waiter = threading.Thread(target=wait, daemon=True)
        began = time.time()
        waiter.start()
        waiter.join(timeout=20)
        assert not waiter.is_alive(), "the trainer still waits for a dead engine's answer"
        assert time.time() - began < 10 and seen and "exit code -9" in seen[0], seen
    finally:
        engine.proc.kill()


def test_a_killed_trainer_leaves_no_engine_behind(tiny_models, tmp_path):
    """SIGKILL of the trainer (no cleanup runs) ends its engine process within seconds."""
    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\n"
        "if __name__ == '__main__':  # the engine is spawned: it imports this file again\n"
        "    sys.path.insert(0, sys.argv[1])\n"
        "    from test_async_rollouts import _engine\n"
        "    engine = _engine({'llama': sys.argv[2]}, 8)\n"
        "    print(engine.proc.pid, flush=True)\n"
        "    time.sleep(600)\n")
    trainer = subprocess.Popen([sys.executable, str(script), os.path.dirname(__file__), str(tiny_models["llama"])],
                               stdout=subprocess.PIPE, text=True)
    try:
        child = int(trainer.stdout.readline())
        assert os.path.exists(f"/proc/{child}")
        trainer.kill()
        trainer.wait()
        deadline = time.time() + 10
        while os.path.exists(f"/proc/{child}") and time.time() < deadline:
            time.sleep(0.1)
        gone = not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"
        assert gone, f"engine process {child} outlived its trainer"
    finally:
        trainer.kill()
