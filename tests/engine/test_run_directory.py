"""What a run directory promises, tried as a careless user and an attacker would: nothing in it runs code,
`latest` stays inside it, Ctrl-C and resume are exact at step boundaries, a diverged model is never saved,
export and re-runs never delete what they were not asked to, a full disk loses nothing."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.rundir.checkpoint import load_trainer_state
from engine.cli import main
from engine.rundir.state_file import read_state
from engine.trainers.optim import Optim

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STAGE = {"sft": "policy", "rm": "reward", "ppo": "policy"}  # each stage's final model
# the update after which each stage is interrupted, and the step it belongs to: SFT and RM update once per
# step; a TINY PPO iteration makes 4 policy updates (8 rollouts / minibatch 4 x 2 epochs): update 6 is in
# iteration 2, between its minibatches
UPDATE, STEP = {"sft": 3, "rm": 3, "ppo": 6}, {"sft": 3, "rm": 3, "ppo": 2}


def copy_before(run_dir, path, stage):
    """A copy of the TINY run without `stage` and the stages after it."""
    later = {"sft": ("sft", "rm", "ppo", "ppo_ptx"), "rm": ("rm", "ppo", "ppo_ptx"), "ppo": ("ppo", "ppo_ptx")}[stage]
    shutil.copytree(run_dir, path, ignore=shutil.ignore_patterns(*later, "report*", "*.png", "samples.json"))
    return path


def final_weights(out, stage):
    return load_file(out / stage / "final" / STAGE[stage] / "model.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def interrupt_after_update(monkeypatch, n: int, how: str):
    """Ctrl-C right after the n-th update of the first optimizer a stage makes (the policy's in PPO, whose update
    is followed by the value model's): a real SIGINT ("signal"), two of them, or a KeyboardInterrupt raised."""
    real, made = Optim.adamw.__func__, []

    def adamw(cls, *args, **kwargs):
        optim = real(cls, *args, **kwargs)
        made.append(optim)
        if len(made) == 1:
            count = [0]

            def after_step(optimizer, args, kwargs):
                count[0] += 1
                if count[0] == n:
                    if how == "signal":
                        os.kill(os.getpid(), signal.SIGINT)
                    elif how == "two signals":  # the second Ctrl-C interrupts at once, inside the step
                        os.kill(os.getpid(), signal.SIGINT)
                        os.kill(os.getpid(), signal.SIGINT)
                    else:
                        raise KeyboardInterrupt
            optim.optimizer.register_step_post_hook(after_step)
        return optim
    monkeypatch.setattr(Optim, "adamw", classmethod(adamw))


@pytest.fixture(scope="module")
def straight(tiny_run, tmp_path_factory, tiny_args):
    """Each of sft, rm, ppo run without interruption from the TINY run's earlier stages."""
    runs = {}
    for stage in STAGE:
        out = copy_before(tiny_run, tmp_path_factory.mktemp("straight") / stage, stage)
        assert main([stage, "--out", str(out), *tiny_args(stage)]) == 0
        runs[stage] = out
    return runs


@pytest.mark.parametrize("stage", list(STAGE))
def test_ctrl_c_after_an_update_finishes_the_step_saves_it_and_resume_is_exact(
        tiny_run, straight, tmp_path, tiny, monkeypatch, stage, caplog):
    out = copy_before(tiny_run, tmp_path / "run", stage)
    # no periodic checkpoint before the end: the one found afterwards is the interrupt's
    args = [stage, "--out", str(out), *tiny(stage), f"--{stage}.checkpoint_every", "100"]
    with monkeypatch.context() as m:
        interrupt_after_update(m, UPDATE[stage], "signal")
        assert main(args) == 130
    assert "finishing this step, then saving it" in caplog.text
    assert (out / stage / "checkpoints" / "latest").read_text() == f"step-{STEP[stage]:06d}"
    assert not (out / stage / "final").exists()
    assert main(args + ["--run.resume", "true"]) == 0
    assert_same(final_weights(straight[stage], stage), final_weights(out, stage))


@pytest.mark.parametrize("stage,how", [(stage, "raise") for stage in STAGE] + [("sft", "two signals")])
def test_interrupt_inside_a_step_saves_nothing_of_it_and_resume_is_exact(
        tiny_run, straight, tmp_path, tiny, monkeypatch, stage, how):
    out = copy_before(tiny_run, tmp_path / "run", stage)
    args = [stage, "--out", str(out), *tiny(stage), f"--{stage}.checkpoint_every", "1"]
    with monkeypatch.context() as m:
        interrupt_after_update(m, UPDATE[stage], how)
        assert main(args) == 130
    # the half-done step is not saved: the run goes on from the checkpoint before it
    assert (out / stage / "checkpoints" / "latest").read_text() == f"step-{STEP[stage] - 1:06d}"
    assert main(args + ["--run.resume", "true"]) == 0
    assert_same(final_weights(straight[stage], stage), final_weights(out, stage))
    steps = [json.loads(line)["step"] for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a step logged twice after the resume"


@pytest.fixture
def interrupted_sft(tiny_run, tmp_path, tiny, monkeypatch):
    """An SFT run stopped inside step 3 with checkpoints at steps 1 and 2 (latest: step-000002)."""
    out = copy_before(tiny_run, tmp_path / "run", "sft")
    args = ["sft", "--out", str(out), *tiny("sft"), "--sft.checkpoint_every", "1"]
    with monkeypatch.context() as m:
        interrupt_after_update(m, 3, "raise")
        assert main(args) == 130
    return out, args


def test_trainer_state_is_safetensors_and_json_and_nothing_in_a_run_is_a_pickle(tiny_run):
    ckpt = tiny_run / "sft" / "checkpoints" / "step-000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["policy", "trainer.json", "trainer.safetensors"]
    state = read_state(ckpt)
    saved = state["optimizers"]["policy"]
    assert state["step"] == 4 and isinstance(saved["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    assert saved["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95) and saved["scheduler"]["last_epoch"] == 4
    for path in tiny_run.rglob("*"):
        if path.is_file():
            assert path.suffix not in (".pt", ".pth", ".bin", ".pkl", ".pickle"), path
            assert not zipfile.is_zipfile(path), f"{path} is a zip archive, as torch.save writes"


def test_malicious_trainer_pt_is_refused_and_its_payload_never_runs(interrupted_sft, tmp_path, capsys):
    out, args = interrupted_sft
    ckpt = out / "sft" / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (ckpt / "trainer.json").unlink()
    (ckpt / "trainer.safetensors").unlink()
    torch.save({"step": 2, "optimizer": Payload()}, ckpt / "trainer.pt")
    assert main(args + ["--run.resume", "true"]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt / 'trainer.pt'}: refused" in err and "could run code" in err and "--run.overwrite true" in err
    assert not marker.exists()
    # the payload is real: unpickling the file the old way runs it
    with open(ckpt / "trainer.pt", "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_old_trainer_pt_still_resumes_exactly(interrupted_sft, straight):
    out, args = interrupted_sft
    ckpt = out / "sft" / "checkpoints" / "step-000002"
    import numpy as np

    state = read_state(ckpt)  # rewritten as the old trainer wrote it: torch.save of its dict, its own keys
    version, internal, gauss = state["rng"]["python"]
    name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    old = {"optimizer": state["optimizers"]["policy"]["optimizer"],
           "scheduler": state["optimizers"]["policy"]["scheduler"], "step": state["step"],
           "rng": {"torch": state["rng"]["torch"], "python": (version, tuple(internal), gauss),
                   "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)}}
    torch.save(old, ckpt / "trainer.pt")
    (ckpt / "trainer.json").unlink()
    (ckpt / "trainer.safetensors").unlink()
    assert load_trainer_state(ckpt)["step"] == 2
    assert main(args + ["--run.resume", "true"]) == 0
    assert_same(final_weights(straight["sft"], "sft"), final_weights(out, "sft"))


@pytest.mark.parametrize("pointer,needle", [
    ("../../../../etc", "may only name a step-N folder beside it"),
    ("/tmp", "may only name a step-N folder beside it"),
    ("step-000001/../../..", "may only name a step-N folder beside it"),
    ("step-000007", "names step-000007, which does not exist"),
    ("step-000009", "is a symbolic link"),
    ("step-000008", "holds no trainer state"),
])
def test_latest_may_only_name_a_complete_sibling_checkpoint(interrupted_sft, tmp_path, capsys, pointer, needle):
    out, args = interrupted_sft
    ckpts = out / "sft" / "checkpoints"
    (ckpts / "step-000009").symlink_to(ckpts / "step-000002", target_is_directory=True)
    shutil.copytree(ckpts / "step-000002" / "policy", ckpts / "step-000008" / "policy")
    (ckpts / "latest").write_text(pointer)
    assert main(args + ["--run.resume", "true"]) == 2
    err = capsys.readouterr().err
    assert needle in err
    if "trainer state" in needle:  # says which checkpoints are complete
        assert "step-000001, step-000002" in err
    assert not (out / "sft" / "final").exists()


def test_damaged_trainer_state_is_one_line(interrupted_sft, capsys):
    out, args = interrupted_sft
    ckpt = out / "sft" / "checkpoints" / "step-000002"
    good_json, good_tensors = (ckpt / "trainer.json").read_text(), (ckpt / "trainer.safetensors").read_bytes()
    (ckpt / "trainer.json").write_text('{"format": "rlhf-engine trainer state", "version": 1, '
                                       '"state": {"step": {"$tensor": "t999"}}}')
    assert main(args + ["--run.resume", "true"]) == 2
    assert "names a tensor 't999'" in capsys.readouterr().err
    (ckpt / "trainer.json").write_text(good_json)
    (ckpt / "trainer.safetensors").write_bytes(good_tensors[: len(good_tensors) // 2])
    assert main(args + ["--run.resume", "true"]) == 2
    assert f"{ckpt / 'trainer.safetensors'}: unreadable" in capsys.readouterr().err
    (ckpt / "trainer.json").unlink()
    assert main(args + ["--run.resume", "true"]) == 2  # no state at all: refused, not restarted from step 0
    assert "holds no trainer state" in capsys.readouterr().err


def test_resume_removes_what_an_interrupted_write_left(interrupted_sft, straight):
    out, args = interrupted_sft
    left = [out / "sft" / "checkpoints" / ".step-000003.tmp-x1y2z3", out / "sft" / ".final.tmp-abcdef",
            out / "sft" / "checkpoints" / ".step-000001.old-4242"]
    for p in left:
        (p / "policy").mkdir(parents=True)
        (p / "policy" / "model.safetensors").write_bytes(b"partial")
    assert main(args + ["--run.resume", "true"]) == 0
    assert not any(p.exists() for p in left)
    assert_same(final_weights(straight["sft"], "sft"), final_weights(out, "sft"))


def test_rerun_without_resume_is_refused_and_overwrite_starts_over(interrupted_sft, capsys):
    out, args = interrupted_sft
    notes = out / "sft" / "my_notes.txt"
    notes.write_text("mine")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out / 'sft'} already holds a sft run (checkpoints up to step-000002)" in err
    assert "--run.resume true" in err and "--run.overwrite true" in err
    assert notes.read_text() == "mine" and (out / "sft" / "checkpoints" / "step-000002").is_dir()
    assert main(args + ["--run.overwrite", "true"]) == 0
    assert not notes.exists() and (out / "sft" / "final").is_dir()


def test_a_changed_learning_rate_is_honoured_on_resume(interrupted_sft, straight, caplog):
    out, args = interrupted_sft
    assert main(args + ["--run.resume", "true", "--sft.lr", "2e-3"]) == 0
    assert "resuming with --sft.lr 0.002 (the checkpoint was trained with 0.001)" in caplog.text
    ours = {r["step"]: r["lr"] for r in map(json.loads, (out / "sft" / "metrics.jsonl").read_text().splitlines())}
    theirs = {r["step"]: r["lr"] for r in map(json.loads, (straight["sft"] / "sft" / "metrics.jsonl").read_text().splitlines())}
    assert ours[2] == pytest.approx(theirs[2])          # before the interruption: the old rate
    assert ours[4] == pytest.approx(2 * theirs[4])      # after the resume: twice the rate, same schedule


def test_divergence_after_resume_names_the_last_good_checkpoint(interrupted_sft, capsys):
    out, args = interrupted_sft
    assert main(args + ["--run.resume", "true", "--sft.lr", "1e30"]) == 3
    err = capsys.readouterr().err
    last = out / "sft" / "checkpoints" / "step-000002"
    assert "sft: the policy model's weights diverged by step 3" in err and f"the last good checkpoint is {last}" in err
    assert (out / "sft" / "checkpoints" / "latest").read_text() == "step-000002"
    good = load_file(last / "policy" / "model.safetensors")
    assert max(t.abs().max().item() for t in good.values()) < 10


def test_divergence_without_a_nan_stops_the_run(tiny_run, tmp_path, tiny, capsys):
    out = tmp_path / "div"
    shutil.copytree(tiny_run / "tokenizer", out / "tokenizer")
    # lr 1e6: weights of ~1e6, loss stuck near ln V, no NaN: it used to finish with exit code 0
    assert main(["pretrain", "--out", str(out), *tiny("pretrain"), "--pretrain.lr", "1e6"]) == 3
    err = capsys.readouterr().err
    assert "pretrain: the policy model's weights diverged" in err and "--pretrain.lr (now 1e+06)" in err
    assert not (out / "pretrain" / "final").exists()


def test_export_never_deletes_what_it_was_not_asked_to(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    other = tmp_path / "other_model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    export = ["export", "--out", str(run), "--stage", "ppo", "--to"]
    assert main(export + [str(other)]) == 2
    assert "is not empty" in capsys.readouterr().err and (other / "config.json").read_text() == "{}"
    for target, needle in [(run, "is the run directory"), (tmp_path, "or holds it"), (run / "ppo", "overlaps the policy"),
                           (run / "sft" / "final" / "policy", "inside the run")]:
        assert main(export + [str(target), "--overwrite", "true"]) == 2
        assert needle in capsys.readouterr().err, target
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert main(export + [str(other), "--overwrite", "true"]) == 0
    assert_same(load_file(other / "model.safetensors"), load_file(run / "ppo" / "final" / "policy" / "model.safetensors"))
    assert main(export + [str(tmp_path / "fresh")]) == 0 and (tmp_path / "fresh" / "config.json").is_file()


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))


def test_a_failed_checkpoint_write_is_one_line_and_loses_nothing(tiny_models, tmp_path):
    """A real failed write (the OS refuses files over 600 kB, as a full disk refuses any byte): the user gets
    one line, no partial checkpoint is left, and the run resumes once there is room."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine", "sft", "--policy.path", str(tiny_models["qwen2"]), "--out", str(out),
           "--data.demonstrations", str(EXAMPLES / "demonstrations.jsonl"), "--run.progress", "false",
           "--sft.steps", "2", "--sft.batch_size", "2", "--sft.checkpoint_every", "1"]
    done = subprocess.run(cmd, preexec_fn=_limit_file_size, capture_output=True, text=True)
    assert done.returncode == 4, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write {out / 'sft' / 'checkpoints' / 'step-000001'}: ")
    assert "File too large" in last and "--run.resume true" in last and "Traceback" not in done.stderr
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not (out / "sft" / "checkpoints" / "latest").exists()
    assert subprocess.run(cmd + ["--run.resume", "true"], capture_output=True).returncode == 0
    assert (out / "sft" / "final" / "policy" / "model.safetensors").is_file()


def test_export_copies_regular_files_only_and_refuses_links_and_special_files(tiny_run, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not the run's")
    cases = {"a link to a file": lambda p: (p / "notes.txt").symlink_to(secret),
             "a link to /dev/zero": lambda p: (p / "zeros.bin").symlink_to("/dev/zero"),
             "a linked folder": lambda p: (p / "extra").symlink_to(tmp_path, target_is_directory=True),
             "a pipe": lambda p: os.mkfifo(p / "pipe"),
             "the policy itself a link": lambda p: (shutil.move(str(p), str(tmp_path / "moved")),
                                                    p.symlink_to(tmp_path / "moved"))}
    for i, (case, plant) in enumerate(cases.items()):
        run = tmp_path / f"run{i}"
        shutil.copytree(tiny_run / "ppo", run / "ppo")
        policy = run / "ppo" / "final" / "policy"
        plant(policy)
        to = tmp_path / f"export{i}"
        assert main(["export", "--out", str(run), "--stage", "ppo", "--to", str(to)]) == 2, case
        err = capsys.readouterr().err
        assert "a run's policy holds only regular files and folders" in err, (case, err)
        assert not to.exists(), case
    run = tmp_path / "run-ok"
    shutil.copytree(tiny_run / "ppo", run / "ppo")
    (run / "ppo" / "final" / "policy" / "sub").mkdir()
    (run / "ppo" / "final" / "policy" / "sub" / "note.txt").write_text("kept")
    assert main(["export", "--out", str(run), "--stage", "ppo", "--to", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "sub" / "note.txt").read_text() == "kept"
    assert_same(load_file(tmp_path / "ok" / "model.safetensors"),
                load_file(run / "ppo" / "final" / "policy" / "model.safetensors"))


def _tree_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_state(ckpt, edit):
    doc = json.loads((ckpt / "trainer.json").read_text())
    edit(doc["state"])
    (ckpt / "trainer.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("edit, says", [
    (lambda s: s.update(step=-5), "step -5 is not a step"),
    (lambda s: s.update(step=1e9), "step 1000000000.0 is not a step"),
    (lambda s: s.update(step=10**9), "at step 1000000000, past this stage's"),
    (lambda s: s["optimizers"]["policy"]["optimizer"]["param_groups"][0].update(lr=-1), "lr -1"),
    (lambda s: s["optimizers"]["policy"]["optimizer"]["param_groups"][0].update(lr="fast"), "lr 'fast'"),
    (lambda s: s["optimizers"]["policy"]["optimizer"]["param_groups"][0].update(lr=float("nan")), "lr nan"),
    (lambda s: s["optimizers"]["policy"]["scheduler"].update(base_lrs=[-1.0]), "base rates [-1.0]"),
    (lambda s: s.update(start_weight_scale="big"), "start_weight_scale 'big'"),
])
def test_a_changed_trainer_state_is_refused_by_name_and_nothing_is_touched(interrupted_sft, capsys, edit, says):
    out, args = interrupted_sft
    ckpt = out / "sft" / "checkpoints" / "step-000002"
    _edit_state(ckpt, edit)
    before = _tree_of(out / "sft")
    assert main(args + ["--run.resume", "true"]) == 2
    err = capsys.readouterr().err
    assert says in err and str(ckpt) in err and "Traceback" not in err, err
    assert _tree_of(out / "sft") == before  # nothing rewritten, metrics included


def test_a_deeply_nested_trainer_state_is_one_line(interrupted_sft, capsys):
    out, args = interrupted_sft
    ckpt = out / "sft" / "checkpoints" / "step-000002"
    (ckpt / "trainer.json").write_text('{"format": "rlhf-engine trainer state", "version": 1, "state": '
                                       + "[" * 100000 + "]" * 100000 + "}")
    assert main(args + ["--run.resume", "true"]) == 2
    assert "not a readable trainer state" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38])
def test_a_damaged_weight_in_a_checkpoint_is_named_as_damage_not_divergence(interrupted_sft, capsys, value):
    from safetensors.torch import save_file

    out, args = interrupted_sft
    ckpt = out / "sft" / "checkpoints" / "step-000002"
    weights = load_file(ckpt / "policy" / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = value
    save_file(weights, ckpt / "policy" / "model.safetensors", metadata={"format": "pt"})
    assert main(args + ["--run.resume", "true"]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt}: the policy model's weight" in err and "the checkpoint is damaged" in err, err
    assert "Lower the learning rate" not in err and "last good" not in err
