"""What a user gets from a plain (non-editable) install: a wheel with every package, whose CLI runs from a
fresh virtual environment, and the compiled kernels wherever the install could build them."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_a_wheel_holds_every_module_and_its_cli_trains_from_a_fresh_venv(tmp_path):
    # The compiled kernels are left out (RLHF_ENGINE_NO_EXT=1: a minute of compiling); what this checks is
    # that packaging keeps every Python module, which editable installs and the tests never notice.
    env = {**os.environ, "RLHF_ENGINE_NO_EXT": "1"}
    src = tmp_path / "src"  # a clean copy: a stale build/ folder would hide a module the build now misses
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             "*.so", "runs", ".benchmarks", ".whl"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src],
        env=env)
    wheel, = (tmp_path / "dist").glob("rlhf_engine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("engine", "kernels"):
        for module in (ROOT / package).rglob("*.py"):
            assert str(module.relative_to(ROOT)) in names, f"{module.relative_to(ROOT)} is missing from {wheel.name}"
    for page in (ROOT / "engine" / "label" / "static").glob("*.*"):  # the labeling app's pages are data
        assert str(page.relative_to(ROOT)) in names, f"{page.relative_to(ROOT)} is missing from {wheel.name}"

    # Its own site-packages first; the rest (torch, transformers) from this environment's site-packages, named
    # in a .pth file. Not --system-site-packages: run inside a virtual environment, that means the base
    # interpreter's packages, where torch need not be.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    own = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    assert ours, sys.path
    (own / "outer_environment.pth").write_text("".join(p + "\n" for p in ours))
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel])
    work = tmp_path / "elsewhere"  # not the source tree, so nothing can be imported from it by accident
    work.mkdir()
    where = run([python, "-c", "import engine.trainers.ppo, kernels; print(engine.__file__)"], cwd=work).stdout
    assert where.strip().startswith(str(venv)), where
    run([python, "-m", "engine", "tiny-model", "--family", "llama", "--to", work / "model"], cwd=work)
    run([python, "-m", "engine", "sft", "--policy.path", work / "model", "--out", work / "run", "--run.progress",
         "false", "--data.demonstrations", ROOT / "examples" / "demonstrations.jsonl", "--sft.steps", "2",
         "--sft.batch_size", "2"], cwd=work)
    assert (work / "run" / "sft" / "final" / "policy" / "model.safetensors").is_file()
    page = run([python, "-c", "from engine.label.app import _page; print(_page('rank.html'))"], cwd=work).stdout
    assert page.startswith("<!doctype html>") and "async function send(" in page


def test_the_cpp_kernels_are_built_wherever_the_install_could_build_them():
    """README's installs build kernels._C when torch and a C++ compiler are there (pyproject.toml makes every
    pip honour --no-build-isolation); without it `auto` silently runs the slow torch paths."""
    if os.environ.get("RLHF_ENGINE_NO_EXT") == "1":
        pytest.skip("RLHF_ENGINE_NO_EXT=1 asked for an install without compiled kernels")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the install is pure Python by design")
    from kernels import dispatch

    assert dispatch.available("gae", "cpu") and dispatch.available("shape_rewards", "cpu"), (
        f"kernels._C was not built ({dispatch._import_errors.get('cpu')}): reinstall with "
        f"`pip install --no-build-isolation -e .` after torch")
    assert dispatch.resolve("gae", "auto", "cpu")[0] == "cpu"
