"""`python -m engine plan`: its flags (one per PlanSettings field, hyphens accepted) and the run."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .settings import PlanSettings

RENAMED = {"gpu_mem_gib": "gpu_mem"}  # the flag a person types: --gpu-mem 80
HELP = {"gpu_mem_gib": "memory per GPU (per process with --device cpu), GiB",
        "policy": "the policy's config.json (shipped: engine/plan/configs/{qwen2.5-0.5b,qwen2.5-7b,llama-3-8b,"
                  "llama-3-70b}.json)"}


def add_arguments(parser) -> None:
    for f in dataclasses.fields(PlanSettings):
        flag = RENAMED.get(f.name, f.name)
        names = [f"--{flag}"] + ([f"--{flag.replace('_', '-')}"] if "_" in flag else [])
        kind = {"int": int, "float": float, "bool": bool, "str": str}[f.type]
        parser.add_argument(*names, dest=f.name, type=kind, default=f.default, help=HELP.get(f.name, ""))
    parser.add_argument("--json", type=str, default=None, help="also write the plan as JSON to this file")


def run_plan(args) -> None:
    from .report import render

    settings = PlanSettings(**{f.name: args[f.name] for f in dataclasses.fields(PlanSettings)})
    text, data = render(settings)
    print(text, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
