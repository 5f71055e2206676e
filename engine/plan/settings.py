"""What a plan is asked about: the job (stage, models, world) and the settings that change its memory."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

STAGES = ("sft", "rm", "dpo", "ppo", "grpo")
DTYPES = ("bfloat16", "float16", "float32")
MAX_RANKS = 2**20  # a million GPUs: ten times the largest cluster there is; more is a typo


@dataclass(frozen=True)
class PlanSettings:
    """stage: sft | rm | dpo | ppo (policy, value, reference, reward, rollout engine) | grpo (ppo without the
    value model). policy / reward / value / reference: config.json files (the reward, value and reference
    default to the policy's shape). device: cuda (memory per GPU) or cpu (resident memory per process)."""
    stage: str = "ppo"
    policy: str = ""
    reward: str = ""
    value: str = ""
    reference: str = ""
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    device: str = "cuda"
    dtype: str = "bfloat16"              # frozen models' weights and the GPU's compute (trained: float32 master)
    micro_batch_tokens: int = 4096       # tokens per micro-batch of a training pass
    gradient_checkpointing: bool = False
    offload_frozen: bool = False         # FSDP2's CPUOffloadPolicy for the reference and reward models
    engine: str = "vllm"                 # the rollout engine: vllm (own weights + KV cache) or hf (the policy)
    engine_tp: int = 1                   # vLLM tensor parallel degree (each engine holds 1/engine_tp)
    engine_sleep: bool = True            # vLLM's sleep mode: its memory freed while the trainer runs
    rollout_sequences: int = 256         # sequences generated at once per engine (prompts x samples / DP)
    rollout_len: int = 2048              # prompt + response tokens per sequence
    overhead_gib: float = 1.0            # per process: CUDA context, NCCL buffers, allocator slack (cuda)
    engine_overhead_gib: float = 0.32    # per vLLM engine process: its runtime beyond weights and KV cache

    def __post_init__(self):
        problems = []
        if self.stage not in STAGES:
            problems.append(f"--stage {self.stage!r}: one of {', '.join(STAGES)}")
        if not self.policy:
            problems.append("--policy CONFIG.json is required (a model's config.json; shipped: "
                            "engine/plan/configs/*.json)")
        for name in ("nodes", "gpus_per_node", "micro_batch_tokens", "engine_tp", "rollout_sequences",
                     "rollout_len"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} {getattr(self, name)}: must be at least 1")
        for name in ("engine_overhead_gib", "overhead_gib"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                problems.append(f"--{name} {value}: must be a number of GiB, at least 0")
        if not math.isfinite(self.gpu_mem_gib) or self.gpu_mem_gib <= 0:
            problems.append(f"--gpu_mem {self.gpu_mem_gib}: must be positive (GiB per GPU)")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype {self.dtype!r}: one of {', '.join(DTYPES)}")
        if self.nodes >= 1 and self.gpus_per_node >= 1 and self.world > MAX_RANKS:
            problems.append(f"--nodes {self.nodes} x --gpus_per_node {self.gpus_per_node} = {self.world:,} ranks: "
                            f"more than {MAX_RANKS:,}; check the two numbers")
        if self.device not in ("cuda", "cpu"):
            problems.append(f"--device {self.device!r}: cuda or cpu")
        if self.engine not in ("vllm", "hf"):
            problems.append(f"--engine {self.engine!r}: vllm or hf")
        if self.engine_tp > self.gpus_per_node:
            problems.append(f"--engine_tp {self.engine_tp} is more than --gpus_per_node {self.gpus_per_node}: "
                            f"tensor parallelism stays within a node")
        if problems:
            raise ValueError("plan: " + "; ".join(problems))

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def but(self, **changes) -> "PlanSettings":
        return replace(self, **changes)
