"""Flag bundles shared by the engine tests: the TINY sizes, and a filter that trims one bundle to what each
command reads (a command refuses flags it would not read)."""
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
# DPO's few steps: given on their own, because every other command (the pipeline without --with_dpo too)
# refuses the dpo section's flags.
DPO_TINY = ["--dpo.steps", "4", "--dpo.batch_size", "4", "--dpo.checkpoint_every", "2", "--dpo.log_every", "1",
            "--dpo.warmup", "1", "--dpo.lr", "3e-3"]


def only_for(command: str, flags, ptx: bool = False) -> list[str]:
    """The (flag, value) pairs of `flags` that `command` reads, so that tests can keep one bundle of flags for
    every stage: a command refuses other sections' flags, the data files it does not read (on a user's
    checkpoint) and, for PPO without --ptx, PPO-ptx's batch size and pretraining text."""
    from engine.commands import READS_FILES, SECTIONS

    out = []
    for flag, value in zip(flags[::2], flags[1::2]):
        section, _, field = flag[2:].partition(".")
        if field and section not in SECTIONS[command]:
            continue
        if section == "data" and command in READS_FILES and field in ("prompts", "demonstrations", "comparisons",
                                                                       "eval_comparisons", "pretrain") \
                and field not in READS_FILES[command]:
            continue
        if flag in ("--ppo.ptx_batch", "--data.pretrain") and command == "ppo" and not ptx:
            continue
        out += [flag, value]
    return out


def cli_with_bundles(argv: list[str]) -> int:
    """engine.cli.main on argv, less the flags its command does not read (see only_for)."""
    from engine.cli import main

    ptx = "--ptx" in argv and argv[argv.index("--ptx") + 1] == "true"
    return main(argv[:1] + only_for(argv[0], argv[1:], ptx))




def tiny_flags(command: str, ptx: bool = False) -> list[str]:
    return only_for(command, TINY, ptx)
