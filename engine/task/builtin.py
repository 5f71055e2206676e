"""The built-in task as a run sees it: what a user would bring, made by code.

- data records in the users' formats (engine/data/formats.py) under OUT/data, which the stages read through
  the same `data.*` paths as a user's files;
- a word-level tokenizer with a chat template (OUT/tokenizer), saved with every checkpoint;
- the tiny Llama that `pretrain` builds and trains, so `sft`, `rm` and `ppo` start from a normal checkpoint;
- held-out labelers, for the win rate against SFT during PPO and for the report.

Everything else (SFT, the reward model, PPO) is the same code a user's checkpoint goes through.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..rundir.atomic import write_text_atomic
from .datasets import FILES, TaskData, make_task_data, save_task_data

# data.* field -> the task's file
DATA_FILES = {"demonstrations": FILES["demonstrations"], "comparisons": FILES["comparisons"],
              "eval_comparisons": FILES["comparisons_heldout"], "prompts": FILES["ppo_prompts"],
              "pretrain": FILES["corpus"]}


@dataclass
class BuiltinTask:
    cfg: object                  # engine.config.TaskConfig
    data: TaskData
    data_dir: Path
    tokenizer_dir: Path

    @classmethod
    def open(cls, cfg, out: Path) -> "BuiltinTask":
        """The task's data, made from `cfg` (a TaskConfig) in memory, and its files under `out`, written on
        first use. A run directory whose data were made with other task settings is refused: its
        checkpoints were trained on those."""
        data_dir, tok_dir = out / "data", out / "tokenizer"
        made = data_dir / "task.json"
        settings = dataclasses.asdict(cfg)
        if made.is_file():
            before = json.loads(made.read_text())
            changed = [f"task.{k}={before.get(k)!r}" for k in settings if before.get(k) != settings[k]]
            if changed:
                raise ValueError(f"{out} holds the built-in task's data made with {', '.join(changed)} ({made}); "
                                 f"give the same --task.* values, or another --out")
        data = make_task_data(cfg)
        if not made.is_file() or not all((data_dir / f).is_file() for f in FILES.values()):
            save_task_data(data, data_dir)
            write_text_atomic(made, json.dumps(settings, indent=2))
        if not (tok_dir / "chat_template.jinja").is_file():
            from .vocab import build_tokenizer

            build_tokenizer().save_pretrained(str(tok_dir))
        return cls(cfg, data, data_dir, tok_dir)

    def data_config(self, data):
        """`data` (a DataConfig) with the task's files in place of a user's."""
        return dataclasses.replace(data, **{k: str(self.data_dir / f) for k, f in DATA_FILES.items()})

    def build_policy(self, model_cfg, tokenizer):
        from .model import build_policy

        return build_policy(model_cfg, tokenizer)

    def ppo_evaluator(self, ctx, sft_policy, proxy=None):
        """evaluate(policy) -> on the first ppo.eval_prompts held-out prompts, one answer each: the held-out
        labelers' win rate of `policy` against `sft_policy` ("win_rate_vs_sft"), gold against proxy
        (engine.task.gold: "gold", "proxy", "kl_to_init", "d_to_init") and the SFT policy's own gold and proxy
        ("gold_sft", "proxy_sft"; its answers are sampled once, here). proxy: batch -> the training reward
        model's scores [B], or None (no proxy)."""
        from . import decode_response
        from .evaluate import sample_tokens, win_rate
        from .gold import gold_and_proxy

        cfg, tok = ctx.cfg, ctx.tokenizer
        insts = self.data.eval_prompts[: cfg.ppo.eval_prompts]
        labelers, temperature = self.data.heldout_labelers, cfg.eval.temperature
        kw = dict(temperature=temperature, max_tokens=cfg.rollout.max_new_tokens, seed=cfg.eval.seed)

        def measure(policy) -> tuple[list, dict]:
            prompts, responses = sample_tokens(policy, tok, insts, **kw)
            m = gold_and_proxy(policy, sft_policy, tok, insts, prompts, responses, labelers, proxy, temperature,
                               ctx.device)
            return [decode_response(tok, r) for r in responses], m
        sft_answers, sft = measure(sft_policy)
        start = {f"{k}_sft": v for k, v in sft.items() if k in ("gold", "proxy")}

        def evaluate(policy) -> dict:
            answers, m = measure(policy)
            m["d_to_init"] = m.pop("d")
            verdict = win_rate(insts, answers, sft_answers, labelers, cfg.eval.seed)
            return {"win_rate_vs_sft": verdict["win_rate"], **m, **start}
        return evaluate

    def report(self, ctx) -> dict:
        from .report import build_report

        return build_report(ctx)
