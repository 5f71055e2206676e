"""What one vLLM engine holds beyond its weights and KV cache, measured: the planner's --engine_overhead_gib.

    python -m bench.vllm_runtime MODEL_DIR     # prints one JSON line; bench_distributed runs it in its own process

A fresh process imports torch, transformers and vLLM, notes its resident memory, starts a VLLMRollout on
MODEL_DIR (float32, the engine's CPU defaults), generates 16 prompts x 16 tokens, and reports the growth
minus the weights the engine holds (its worker's parameters) and the KV cache it was given.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import sys


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(model_dir: str) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from engine.models.forward import quiet_transformers
    from engine.rollout.vllm import CPU_KV_CACHE_BYTES, VLLMRollout

    quiet_transformers()
    importlib.import_module("vllm")  # before the baseline, as in the planner's process_baseline

    before = rss_bytes()
    with VLLMRollout(model_dir, dtype="float32", seed=0, max_model_len=64,
                     kv_cache_memory_bytes=CPU_KV_CACHE_BYTES) as engine:
        engine.generate([[1 + (i * 7 + j) % 50 for j in range(20)] for i in range(16)], max_tokens=16, seed=0)
        grown, weights = rss_bytes() - before, engine.held_bytes()
    runtime = grown - weights - CPU_KV_CACHE_BYTES
    return {"grown_mib": grown / 2**20, "weights_mib": weights / 2**20, "kv_cache_mib": CPU_KV_CACHE_BYTES / 2**20,
            "runtime_gib": runtime / 2**30}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
