import pytest

# A whole run in seconds: tiny data, a 1-layer model, a few steps per stage.
TINY = [
    "--run.progress", "false", "--run.threads", "2",
    "--task.n_corpus", "300", "--task.n_corpus_heldout", "40", "--task.n_demonstrations", "120",
    "--task.n_comparisons", "40", "--task.n_comparisons_heldout", "40", "--task.n_ppo_prompts", "64",
    "--task.n_eval_prompts", "24",
    "--model.hidden_size", "64", "--model.num_heads", "1", "--model.num_layers", "1",
    "--model.intermediate_size", "64",
    "--pretrain.steps", "6", "--pretrain.batch_size", "8", "--pretrain.checkpoint_every", "3",
    "--pretrain.log_every", "2", "--pretrain.warmup", "2",
    "--sft.steps", "4", "--sft.batch_size", "8", "--sft.checkpoint_every", "2", "--sft.log_every", "2",
    "--sft.warmup", "2",
    "--rm.steps", "4", "--rm.batch_size", "4", "--rm.checkpoint_every", "2", "--rm.log_every", "2",
    "--rm.warmup", "2",
    "--ppo.iterations", "3", "--ppo.rollout_batch", "8", "--ppo.minibatch", "4", "--ppo.epochs", "2",
    "--ppo.ptx_batch", "4", "--ppo.eval_every", "2", "--ppo.eval_prompts", "8", "--ppo.checkpoint_every", "2",
    "--rollout.max_new_tokens", "8",
]


@pytest.fixture(scope="session")
def tiny_args():
    """The TINY flags, for fixtures wider than one test (a tuple: nobody edits it)."""
    return tuple(TINY)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_args):
    """A whole built-in pipeline run at the TINY sizes, shared read-only by the tests (copy before changing)."""
    from engine.cli import main

    out = tmp_path_factory.mktemp("pipeline")
    assert main(["pipeline", "--out", str(out), *tiny_args]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: directory} of small random checkpoints of each real family (`tiny-model`), read-only."""
    from engine.tiny_checkpoint import FAMILIES, write_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {f: write_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture
def tiny():
    """The TINY flags as a fresh list a test may edit."""
    return list(TINY)


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
