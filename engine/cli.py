"""One CLI: `python -m engine <command>`. Every stage is a command; every config field is a flag
(`--ppo.kl_coef 0.05`), and `--config preset.yaml` loads a preset whose keys map one to one onto the
dataclasses in engine/config.py. Parsing is jsonargparse's: unknown keys and bad types are errors."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from typing import Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from .config import (Config, DataConfig, EvalConfig, FrozenModelConfig, LMTrainConfig, ModelConfig, PPOConfig,
                     RewardConfig, RolloutConfig, RunConfig, TaskConfig, TrainedModelConfig)

SECTIONS = {"run": RunConfig, "task": TaskConfig, "model": ModelConfig, "pretrain": LMTrainConfig,
            "sft": LMTrainConfig, "rm": RewardConfig, "ppo": PPOConfig, "rollout": RolloutConfig,
            "eval": EvalConfig, "policy": TrainedModelConfig, "reference": FrozenModelConfig,
            "reward": FrozenModelConfig, "value": TrainedModelConfig, "data": DataConfig}

COMMANDS = {
    "pretrain": "pretrain the tiny LM on the built-in corpus",
    "sft": "supervised fine-tuning on the demonstrations",
    "rm": "train the reward model on K-way rankings (all K-choose-2 pairs per prompt)",
    "ppo": "PPO against the reward model (--ptx true for PPO-ptx)",
    "eval": "held-out labelers' win rates, RM accuracy, alignment tax -> report.md / report.json",
    "pipeline": "all of the above in order: pretrain, sft, rm, ppo, ppo-ptx, eval",
    "reproduce": "Figure 1 in miniature: SFT, PPO, PPO-ptx at several model sizes (a benchmark, minutes each)",
    "export": "write a run's final policy as a plain transformers directory (loads in transformers and vLLM)",
    "tiny-model": "write a small random checkpoint of a real family (llama, qwen2, mistral, gpt2) with its "
                  "tokenizer, to try --policy.path without downloads",
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m engine", description="rlhf-engine: InstructGPT's RLHF, end to end.")
    sub = parser.add_subcommands(dest="command", required=True)
    defaults = Config()
    for name, help_text in COMMANDS.items():
        p = ArgumentParser(description=help_text)
        p.add_argument("--config", action=ActionConfigFile, help="YAML preset (keys: " + ", ".join(SECTIONS) + ")")
        p.add_argument("--out", type=Optional[str], default=None, help="output directory (same as --run.out)")
        for section, cls in SECTIONS.items():
            p.add_argument(f"--{section}", type=cls, default=getattr(defaults, section))
        if name == "ppo":
            p.add_argument("--ptx", type=bool, default=False, help="PPO-ptx: add ppo.ptx_coef x pretraining loss")
        if name == "reproduce":
            p.add_argument("--sizes", type=list[int], default=[64, 128, 256], help="hidden sizes to train")
            p.add_argument("--record", type=bool, default=True,
                           help="also copy figure1.{png,md,json} to bench/results/<device>/ (source checkouts)")
        if name == "export":
            p.add_argument("--to", type=str, required=True, help="directory to write")
            p.add_argument("--stage", type=str, default="ppo", help="which policy: pretrain, sft, ppo or ppo_ptx")
            p.add_argument("--overwrite", type=bool, default=False,
                           help="replace a non-empty --to directory (never one that is, holds or is inside the run)")
        if name == "tiny-model":
            p.add_argument("--family", type=str, default="llama", help="llama, qwen2, mistral or gpt2")
            p.add_argument("--to", type=str, required=True, help="directory to write")
        sub.add_subcommand(name, p, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = build_parser()
    try:
        args = parser.instantiate(parser.parse_args(argv))
        command = args.command
        sub = args[command]
        cfg = Config(**{s: sub[s] for s in SECTIONS})
        if sub.out is not None:
            cfg.run.out = sub.out
        if not cfg.local and any(dataclasses.astuple(cfg.data)[:5]):
            raise ValueError("--data.* files train your own checkpoint: give --policy.path DIR too (the built-in "
                             "task makes its own data)")
    except ValueError as exc:  # a config value failed validation
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from . import stages
    from .checkpoint import CheckpointWriteError
    from .context import make_context
    from .guard import DivergedError
    from .trainers.loop import StoppedAtStepBoundary

    try:
        if command == "reproduce":
            from .reproduce import reproduce

            reproduce(cfg, sub.sizes, sub.record)
            return 0
        if command == "export":
            from .export import export_policy

            print(export_policy(cfg.run.out, sub.stage, sub.to, overwrite=sub.overwrite))
            return 0
        if command == "tiny-model":
            from .tiny_checkpoint import write_tiny_model

            print(write_tiny_model(sub.family, sub.to, seed=cfg.run.seed))
            return 0
        precision = contextlib.nullcontext()
        if cfg.local:
            from . import local_stages as stages
            from .loading import compute_precision

            precision = compute_precision(cfg.run)
        ctx = make_context(cfg)
        with precision:
            if command == "ppo":
                stages.ppo(ctx, ptx=sub.ptx)
            else:
                getattr(stages, {"eval": "evaluate"}.get(command, command))(ctx)
    except DivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except CheckpointWriteError as exc:
        print(f"error: {exc.strerror}; nothing written before it was changed (the last complete checkpoint "
              f"stays): make room, then rerun the same command with --run.resume true", file=sys.stderr)
        return 4
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoppedAtStepBoundary:
        print("interrupted: the last finished step is saved; rerun the same command with --run.resume true",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted in the middle of a step: its partial update was not saved; rerun the same command "
              "with --run.resume true to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0
