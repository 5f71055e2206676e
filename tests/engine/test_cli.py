"""The CLI: one entry point, complete help, unknown keys and bad values rejected with the key named."""
import subprocess
import sys

import pytest

from engine.cli import COMMANDS, main


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("pretrain", "sft", "rm", "ppo", "eval", "pipeline", "reproduce"):
        assert command in out and command in COMMANDS


def test_subcommand_help_shows_config_fields(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--ppo.kl_coef", "--ppo.clip_eps", "--rollout.backend", "--ptx", "--out", "--config"):
        assert flag in out, flag


def test_unknown_key_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ppo", "--ppo.kl_coeff", "0.1"])
    assert exc.value.code == 2
    assert "kl_coeff" in capsys.readouterr().err


def test_unknown_key_in_yaml_preset_is_an_error(tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_text("ppo:\n  kl_coef: 0.1\n  no_such_key: 3\n")
    with pytest.raises(SystemExit) as exc:
        main(["ppo", "--config", str(preset)])
    assert exc.value.code == 2
    assert "no_such_key" in capsys.readouterr().err


def test_yaml_preset_values_are_used(tmp_path):
    from engine.cli import build_parser

    preset = tmp_path / "preset.yaml"
    preset.write_text("ppo:\n  kl_coef: 0.125\nrun:\n  out: somewhere\n")
    parser = build_parser()
    args = parser.instantiate(parser.parse_args(["ppo", "--config", str(preset), "--ppo.epochs", "3"]))
    assert args.ppo.ppo.kl_coef == 0.125 and args.ppo.ppo.epochs == 3 and args.ppo.run.out == "somewhere"


@pytest.mark.parametrize("flag,value,needle", [
    ("--ppo.kl_estimator", "k9", "ppo.kl_estimator"),
    ("--ppo.minibatch", "7", "ppo.minibatch"),
    ("--task.k_min", "1", "task.k_min"),
    ("--rollout.backend", "tpu", "rollout.backend"),
    ("--run.device", "gpu", "run.device"),
    ("--run.offload_frozen", "true", "run.offload_frozen moves the frozen models' shards from the GPU"),
    ("--rollout.tensor_parallel", "2", "rollout.tensor_parallel 2 needs --rollout.backend vllm"),
    ("--rollout.tensor_parallel", "0", "rollout.tensor_parallel must be >= 1"),
])
def test_bad_values_name_the_key(flag, value, needle, capsys):
    assert main(["ppo", flag, value]) == 2
    assert needle in capsys.readouterr().err


def test_wrong_type_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ppo", "--ppo.iterations", "many"])
    assert exc.value.code == 2
    assert "iterations" in capsys.readouterr().err


def test_missing_previous_stage_says_what_to_run(tmp_path, capsys):
    assert main(["ppo", "--out", str(tmp_path), "--task.n_corpus", "50", "--task.n_demonstrations", "20",
                 "--task.n_comparisons", "10", "--task.n_comparisons_heldout", "10", "--task.n_ppo_prompts", "10",
                 "--task.n_eval_prompts", "5"]) == 2
    err = capsys.readouterr().err
    assert "python -m engine sft" in err and str(tmp_path) in err


def test_python_dash_m_engine_runs():
    done = subprocess.run([sys.executable, "-m", "engine", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "pipeline" in done.stdout


def test_reproduce_records_the_device_it_ran_on(monkeypatch):
    """Figure 1's provenance names the run's device (it once said "cpu" on a GPU). No GPU here: the CUDA name
    comes from torch.cuda.get_device_name, replaced for this test."""
    import torch

    from engine.reproduce import _bench_results_dir, provenance

    assert provenance(1.0, "cpu")["device"].startswith("cpu (")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert provenance(1.0, "cuda")["device"] == "NVIDIA H100 80GB HBM3"
    assert _bench_results_dir("cuda").name == "nvidia-h100-80gb-hbm3"
    assert _bench_results_dir("cpu").name.startswith("cpu-")
