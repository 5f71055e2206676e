from pathlib import Path

import pytest

from flag_bundles import cli_with_bundles, tiny_flags


@pytest.fixture(scope="session")
def tiny_args():
    """tiny_args(command, ptx=False): the TINY flags for a command, for fixtures wider than one test."""
    return tiny_flags


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_args):
    """A whole built-in pipeline run at the TINY sizes, shared read-only by the tests (copy before changing)."""
    from engine.cli import main

    import contextlib
    import io
    import sys

    out = tmp_path_factory.mktemp("pipeline")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["pipeline", "--out", str(out), *tiny_args("pipeline")]) == 0
    sys.stdout.write(printed.getvalue())
    Path(f"{out}.stdout").write_text(printed.getvalue())  # beside the run: what the pipeline printed
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: directory} of small random checkpoints of each real family (`tiny-model`), read-only."""
    from engine.task.tiny_checkpoint import FAMILIES, write_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {f: write_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def cli():
    """cli(argv): run the CLI with shared flag bundles trimmed to what the command reads."""
    return cli_with_bundles


@pytest.fixture
def tiny():
    """tiny(command, ptx=False): the TINY flags for a command, as a fresh list a test may edit."""
    return tiny_flags


def interrupt_after(monkeypatch, module, name, calls):
    """Raise KeyboardInterrupt (what Ctrl-C raises) on the calls-th call of module.name."""
    real, count = getattr(module, name), {"n": 0}

    def wrapped(*a, **k):
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(module, name, wrapped)


@pytest.fixture
def interrupt():
    """interrupt(monkeypatch, module, name, calls): Ctrl-C on the calls-th call of module.name."""
    return interrupt_after
