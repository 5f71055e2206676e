"""One CLI: `python -m engine <command>`. Every stage is a command; every config field a command reads is a
flag (`--ppo.kl_coef 0.05`), and `--config preset.yaml` loads a preset whose keys map one to one onto the
dataclasses in engine/config.py. Parsing is jsonargparse's: unknown keys and bad types are errors, and a
command offers only the sections it reads; within them a field it does not read is refused by name when it
is set (engine/commands.py)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Transparent huge pages for torch's CPU tensors of 2 MiB and more (PyTorch's own switch, read at the first
# such allocation): a fresh [tokens x vocab] gradient or a [B, T] reward tensor otherwise costs one page fault
# per 4 KiB, which on the 2-core CPU machine made writing fresh memory 3x slower than writing reused memory
# (bench/results/cpu-2core/kernels.md). A value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
from dataclasses import dataclass
from typing import Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from .commands import COMMANDS, SECTIONS, unread
from .config import (Config, DataConfig, DPOConfig, EvalConfig, FrozenModelConfig, GoldConfig, LMTrainConfig,
                     ModelConfig, PPOConfig, RewardConfig, RewardSourceConfig, RolloutConfig, RunConfig, TaskConfig,
                     TrainedModelConfig)

TYPES = {"run": RunConfig, "task": TaskConfig, "model": ModelConfig, "pretrain": LMTrainConfig,
         "sft": LMTrainConfig, "rm": RewardConfig, "ppo": PPOConfig, "dpo": DPOConfig, "rollout": RolloutConfig,
         "eval": EvalConfig, "policy": TrainedModelConfig, "reference": FrozenModelConfig,
         "reward": RewardSourceConfig, "value": TrainedModelConfig, "data": DataConfig, "gold": GoldConfig}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m engine", description="rlhf-engine: InstructGPT's RLHF, end to end.")
    sub = parser.add_subcommands(dest="command", required=True)
    defaults = Config()
    for name, help_text in COMMANDS.items():
        p = ArgumentParser(description=help_text)
        sections = SECTIONS[name]
        if sections:
            p.add_argument("--config", action=ActionConfigFile, help="YAML preset (keys: " + ", ".join(sections) + ")")
        if name == "plan":
            from .plan.commands import add_arguments

            add_arguments(p)
            sub.add_subcommand(name, p, help=help_text)
            continue
        if name == "label":
            from .label.commands import add_actions

            sub.add_subcommand(name, p, help=help_text)
            add_actions(p)
            continue
        p.add_argument("--out", type=Optional[str], default=None,
                       help="the run directory" + (" (same as --run.out)" if sections else ""))
        for section in sections:
            p.add_argument(f"--{section}", type=TYPES[section], default=getattr(defaults, section))
        if name == "ppo":
            p.add_argument("--ptx", type=bool, default=False, help="PPO-ptx: add ppo.ptx_coef x pretraining loss")
        if name == "pipeline":
            p.add_argument("--with_dpo", type=bool, default=False,
                           help="also train DPO (--dpo.loss) from the SFT policy, beside PPO, and report it")
        if name == "reproduce":
            p.add_argument("--sizes", type=list[int], default=[64, 128, 256], help="hidden sizes to train")
            p.add_argument("--record", type=bool, default=True,
                           help="also copy figure1.{png,md,json} to bench/results/<device>/ (source checkouts)")
        if name == "export":
            p.add_argument("--to", type=str, required=True, help="directory to write")
            p.add_argument("--stage", type=str, default="ppo",
                           help="which policy: pretrain, sft, ppo, ppo_ptx, dpo, dpo_ipo or dpo_listwise")
            p.add_argument("--overwrite", type=bool, default=False,
                           help="replace a non-empty --to directory (never one that is, holds or is inside the run)")
        if name == "tiny-model":
            p.add_argument("--family", type=str, default="llama", help="llama, qwen2, mistral or gpt2")
            p.add_argument("--to", type=str, required=True, help="directory to write")
            p.add_argument("--seed", type=int, default=0, help="the random initialisation's seed")
        sub.add_subcommand(name, p, help=help_text)
    return parser


@dataclass
class Command:
    name: str
    cfg: Config
    args: object          # the subcommand's own arguments (ptx, sizes, to, ...)


def parse(argv: list[str] | None = None, parser: ArgumentParser | None = None) -> Command:
    """The command and its validated config. SystemExit(2) for what jsonargparse refuses (unknown keys, bad
    types); ValueError for values that cannot work and for fields the command would not read."""
    parser = parser or build_parser()
    args = parser.instantiate(parser.parse_args(argv))
    name = args.command
    sub = args[name]
    if name in ("label", "plan"):
        return Command(name, Config(), sub)
    cfg = Config(**{s: sub[s] for s in SECTIONS[name]})
    if sub.out is not None:
        cfg.run.out = sub.out
    refused = unread(name, cfg, ptx=bool(getattr(sub, "ptx", False)), dpo=bool(getattr(sub, "with_dpo", False)))
    if refused:
        raise ValueError(f"`{name}` would not read " + "; ".join(refused))
    return Command(name, cfg, sub)


def main(argv: list[str] | None = None) -> int:
    from .parallel import distributed as dist

    # Under torchrun every process runs this; the main one logs, the others only warn.
    rank = int(os.environ.get("RANK", "0")) if dist.launched() else 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)s " + (f"[rank {rank}] " if dist.launched() else "")
                        + "%(message)s")
    try:
        command = parse(argv)
    except ValueError as exc:  # a config value failed validation, or a field the command does not read
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    from .parallel import peers

    code = 1
    try:
        code = _run_and_report(command, rank)
    finally:  # this rank ends with a message of its own (or a traceback): its peers add nothing
        if code and dist.launched():
            peers.said_why()
    return code


def _run_and_report(command: Command, rank: int) -> int:
    """run(command) with every way it can end as an exit code and one message."""
    from torch.distributed import DistError

    from .parallel import distributed as dist
    from .parallel import peers
    from .rundir.atomic import CheckpointWriteError
    from .rundir.guard import DivergedError
    from .rollout.async_engine import EngineProcessDied
    from .trainers.loop import StoppedAtStepBoundary

    try:
        run(command)
    except DivergedError as exc:  # one process (several leave from run() itself, together)
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except CheckpointWriteError as exc:
        print(f"error: {exc.strerror}; nothing written before it was changed (the last complete checkpoint "
              f"stays): make room, then rerun the same command with --run.resume true", file=sys.stderr)
        return 4
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}" if not dist.launched() else f"error (rank {rank}): {exc}", file=sys.stderr)
        return 2
    except StoppedAtStepBoundary:
        print("interrupted: the last finished step is saved; rerun the same command with --run.resume true",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted in the middle of a step: its partial update was not saved; rerun the same command "
              "with --run.resume true to continue from the last checkpoint", file=sys.stderr)
        return 130
    except EngineProcessDied as exc:
        print(f"error: {exc}. The last checkpoint is kept: rerun the same command with --run.resume true",
              file=sys.stderr)
        return 5
    except RuntimeError as exc:  # a collective failed because a peer is gone (killed, or crashed outside Python)
        if not dist.launched() or not (isinstance(exc, DistError) or peers.peer_lost(wait=5.0)):
            raise
        peers.say_farewell(wait=5.0)
        peers.said_why()
        return 1
    return 0


def run(command: Command) -> None:
    name, cfg, args = command.name, command.cfg, command.args
    if name == "export":
        from .rundir.export import export_policy

        print(export_policy(cfg.run.out, args.stage, args.to, overwrite=args.overwrite))
        return
    if name == "tiny-model":
        from .task.tiny_checkpoint import write_tiny_model

        print(write_tiny_model(args.family, args.to, seed=args.seed))
        return
    if name == "label":
        from .label.commands import run_action

        run_action(args)
        return
    if name == "plan":
        from .plan.commands import run_plan

        run_plan(args)
        return
    from .rundir.run_lock import run_lock

    if name == "reproduce":
        from .reproduce import reproduce

        with run_lock(Path(cfg.run.out)):
            reproduce(cfg, args.sizes, args.record)
        return
    from . import stages
    from .context import make_context
    from .models.loading import compute_precision

    from .parallel import distributed as dist
    from .parallel import peers
    from .rundir.guard import DivergedError

    dist.init(cfg.run.device, cfg.run.dist_timeout)
    clean = False
    try:
        with run_lock(Path(cfg.run.out)), compute_precision(cfg.run):  # one run per directory, for its life
            ctx = make_context(cfg)
            if name == "ppo":
                stages.ppo(ctx, ptx=args.ptx)
            elif name == "pipeline":
                stages.pipeline(ctx, with_dpo=args.with_dpo)
            else:
                getattr(stages, {"eval": "evaluate"}.get(name, name))(ctx)
        clean = True
    except DivergedError as exc:
        if not dist.launched():
            raise
        # Every rank raises it at the same step (the loss and the weight check are collectives). The main
        # rank says why before they meet, each leaves its note that the job ended with a message, and all
        # exit 3 the moment they have met, with no teardown: a rank that exits first makes torchrun SIGTERM
        # the others, which would cut the message off or add "ended without a word" (the loops have closed
        # their files on the way out; the run lock is the kernel's and ends with the process).
        if dist.world().main:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        peers.said_why()
        dist.barrier()
        peers.exit_now(3)
    finally:
        dist.close(clean)
