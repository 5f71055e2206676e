"""README opens with the two commands, and CI runs exactly the second one."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_opens_with_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("```bash\n")
    install_and_run, test = _readme_commands()
    assert "python -m engine pipeline" in install_and_run and "pip install" in install_and_run
    assert "pytest" in test


def test_ci_runs_readme_second_command_in_a_fresh_venv():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().strip().splitlines()]
    command = ci.index(_readme_commands()[1])  # the whole command, on one line of its own
    venv = next(i for i, line in enumerate(ci) if line.startswith("python3 -m venv"))
    activate = next(i for i, line in enumerate(ci) if line.startswith(". ") and line.endswith("/bin/activate\""))
    assert venv < activate < command


def test_readme_real_model_commands_run(tmp_path, monkeypatch):
    """The README's own-model commands, as written, with a few steps each (checkpoint paths under tmp)."""
    import shlex

    from engine.cli import main

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own model and data"):]
    block = re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("python -m engine")]
    assert [c[3] for c in commands] == ["sft", "rm", "ppo", "export", "dpo"]
    monkeypatch.chdir(ROOT)
    model = tmp_path / "models" / "tiny-qwen2"
    assert main(["tiny-model", "--family", "qwen2", "--to", str(model)]) == 0
    few = {"sft": ["--sft.steps", "2", "--sft.batch_size", "2"], "rm": ["--rm.steps", "2", "--rm.batch_size", "2"],
           "ppo": ["--ppo.iterations", "1", "--ppo.rollout_batch", "2", "--ppo.minibatch", "2",
                   "--rollout.max_new_tokens", "4"], "dpo": ["--dpo.steps", "2", "--dpo.batch_size", "2"]}
    for argv in commands:
        argv = [str(tmp_path / a) if a.startswith(("models/", "runs/", "exported/")) else a for a in argv[3:]]
        extra = ["--run.progress", "false", *few[argv[0]]] if argv[0] in few else []
        assert main(argv + extra) == 0, argv
    assert (tmp_path / "exported" / "mine-ppo" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "mine" / "dpo_listwise" / "final" / "policy" / "model.safetensors").is_file()
