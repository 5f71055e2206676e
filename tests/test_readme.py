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


def test_ci_runs_readme_second_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == _readme_commands()[1]
