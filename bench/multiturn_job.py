"""The multi-turn job both sides of `python -m bench.bench_multiturn speed` run: one tool, one reward, one
checkpoint that calls the tool.

The tool (`lookup`) knows each noun's colour in a world the model was not pretrained on; the reward is 1 for an
episode whose last turn is exactly "the <noun> was <colour>". The checkpoint: a small Qwen2 with the built-in
byte-level tokenizer (engine/task/tiny_checkpoint.py) given Qwen2.5's chat template (TRL's copy, which TRL's
tool-calling check accepts and its response parser knows), fine-tuned with TRL's SFTTrainer on conversations
that call the tool, so that episodes have the turns the job is about.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from engine.task.vocab import COLORS, NOUNS

WORLD = {noun: COLORS[(3 * i + 1) % len(COLORS)] for i, noun in enumerate(NOUNS)}  # not the pretraining colours


def lookup(noun: str) -> str:
    """The colour of a thing in this world.

    Args:
        noun: the thing, one word
    """
    return f"the {noun} was {WORLD.get(noun.strip().lower(), 'unknown')}"


def _target(prompt: str) -> str:
    noun = prompt.rstrip(" ?").split()[-1]
    return f"the {noun} was {WORLD.get(noun, '?')}"


def correct(prompts: list[str], responses: list[str]) -> list[float]:
    """The engine's reward function: the episode's text (every turn) ends with the right answer."""
    return [float(r.strip().endswith(_target(p))) for p, r in zip(prompts, responses)]


def correct_trl(prompts, completions, **kw) -> list[float]:
    """TRL's reward function: the last assistant turn is the right answer."""
    out = []
    for p, c in zip(prompts, completions):
        last = next((m.get("content") or "" for m in reversed(c) if m["role"] == "assistant"), "")
        out.append(float(last.strip().endswith(_target(p[-1]["content"]))))
    return out


def question(noun: str) -> str:
    return f"what color was the {noun} ?"


def write_checkpoint(work: Path, *, hidden: int, layers: int, heads: int, sft_steps: int, seed: int = 0) -> Path:
    """The job's SFT checkpoint under work/sft (made once)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import qwen2_5_chat_template

    from engine.episodes.tools import schema
    from engine.task.tiny_checkpoint import build_config, build_tokenizer

    out = work / "sft"
    if (out / "config.json").is_file():
        return out
    tok = build_tokenizer("qwen2")
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tok.chat_template = qwen2_5_chat_template
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config("qwen2", tok, hidden=hidden, layers=layers, heads=heads,
                                                          positions=1024))
    rng, tools = random.Random(seed), [schema(lookup)]
    rows = []
    for _ in range(2000):
        noun = rng.choice(NOUNS)
        call = {"type": "function", "function": {"name": "lookup", "arguments": {"noun": noun}}}
        rows.append({"messages": [{"role": "user", "content": question(noun)},
                                  {"role": "assistant", "content": "", "tool_calls": [call]},
                                  {"role": "tool", "name": "lookup", "content": lookup(noun)},
                                  {"role": "assistant", "content": lookup(noun)}], "tools": tools})
    cfg = SFTConfig(output_dir=str(work / "sft-trainer"), max_steps=sft_steps, per_device_train_batch_size=16,
                    learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=20, use_cpu=True, bf16=False,
                    report_to=[], save_strategy="no", logging_steps=50, seed=seed, max_length=1024)
    SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok).train()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_prompts(work: Path, n: int = 256, seed: int = 1) -> Path:
    rng = random.Random(seed)
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": question(rng.choice(NOUNS))}) + "\n" for _ in range(n)))
    return path
