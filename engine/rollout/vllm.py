"""Rollouts from a running vLLM engine, with the trainer's weights pushed into it in place.

The one module that owns vLLM (everything else talks to the protocol in `base.py`). The engine runs in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless the caller set it), so `update_weights` hands
tensors to the worker without serialising them; the same calls work across processes through
`collective_rpc`. Usable on its own by people with their own trainer:

    with VLLMRollout("my_model_dir", dtype="float32") as rollout:
        out = rollout.generate([[1, 5, 7]], n=4, max_tokens=32)
        rollout.update_weights(model.named_parameters())
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from .base import RolloutResult, prompt_seeds as _prompt_seeds

WORKER_EXTENSION = "engine.rollout.vllm_worker.WeightSyncExtension"
DEFAULT_BUCKET_BYTES = 512 * 2**20
CPU_KV_CACHE_BYTES = 2**30  # vLLM's CPU backend: the KV cache an engine gets unless VLLM_CPU_KVCACHE_SPACE says


def vllm_available() -> tuple[bool, str]:
    """(importable, why not) without starting anything."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "absent"
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int):
    """Group (name, tensor) pairs into lists of at most max_bytes each (a larger tensor goes alone)."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def external_launcher(tp: int) -> dict:
    """vLLM's arguments for an engine spread over `tp` of this torchrun launch's processes (each holding 1/tp
    of the weights), as verl's hybrid engine runs it: vLLM joins the launch's process group instead of
    starting workers, and every process of an engine group must call it with the same prompts (its
    scheduling is deterministic). With more processes than tp, the groups are vLLM's data-parallel ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tp:
        raise ValueError(f"tensor parallel {tp} (--rollout.tensor_parallel) does not divide the {world} process(es) "
                         f"of this launch: each engine spans {tp} of them. Start a multiple of {tp} processes "
                         f"(torchrun --nproc_per_node), or lower the tensor parallel size")
    kw = dict(tensor_parallel_size=tp, distributed_executor_backend="external_launcher")
    if world > tp:
        kw["data_parallel_size"] = world // tp
    return kw


class VLLMRollout:
    """Generate with an in-process `vllm.LLM` and sync trainer weights into it each PPO iteration.

    model_dir: a transformers checkpoint directory (the engine starts from these weights).
    dtype: "auto" | "float32" | "bfloat16" | ...; seed: the engine's sampling seed.
    bucket_bytes: the most weight bytes one collective_rpc call carries (not a bound on the memory the
    sync holds: see `update_weights`).
    cpu_packed_gemm: on vLLM's CPU backend, keep its oneDNN-packed linear layers (decoding 1.5-1.8x faster
    from tens of millions of parameters up on 2 cores; every sync then repacks them at oneDNN's 2-6 GB/s)
    instead of the plain layout (F.linear on the weight), in which every parameter is synced in place.
    Ignored on GPUs, whose unquantized layers are plain slices either way.
    tensor_parallel: > 1 under torchrun: this process is one rank of an engine spread over tensor_parallel
    processes (`external_launcher`); update_weights then takes whole tensors and keeps this rank's slices.
    engine_kwargs: passed to `vllm.LLM` (e.g. gpu_memory_utilization, enable_sleep_mode, enforce_eager).
    Log-probs are returned as the sampler saw them (temperature applied: logprobs_mode="processed_logprobs"),
    the same quantity the trainer recomputes, so their mismatch measures the engines' numerical difference.
    """

    def __init__(self, model_dir, *, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, cpu_packed_gemm: bool = False, tensor_parallel: int = 1,
                 **engine_kwargs):
        ok, why = vllm_available()
        if not ok:
            raise ImportError(f"VLLMRollout needs vLLM ({why}); install `pip install -e .[vllm]` (CPU) or a vllm "
                              "build matching your torch, or use HFRollout")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"VLLMRollout: {model_dir} is not a transformers model directory (no config.json)")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        on_cpu = not torch.cuda.is_available()
        if on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            # 1 GiB of KV cache per engine; an engine of tensor_parallel ranks holds each layer's heads split
            # between them, so each rank's share of the same capacity is 1/tensor_parallel of it
            engine_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES // tensor_parallel)
        if on_cpu:
            engine_kwargs.setdefault("enforce_eager", True)
            from .vllm_worker import PLAIN_CPU_GEMM, use_plain_cpu_gemm

            os.environ[PLAIN_CPU_GEMM] = "0" if cpu_packed_gemm else "1"  # for a worker in another process
            use_plain_cpu_gemm(not cpu_packed_gemm)                         # for this one
        engine_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        if tensor_parallel > 1:
            engine_kwargs.update(external_launcher(tensor_parallel))
        from vllm import LLM

        self.bucket_bytes = bucket_bytes
        self.last_sync: dict = {}  # how the last update_weights went: {"in_place": n, "reloaded": [...], ...}
        self.llm = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                       max_model_len=max_model_len, worker_extension_cls=WORKER_EXTENSION, **engine_kwargs)

    def generate(self, prompt_token_ids, *, n: int = 1, max_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, stop_token_ids=None,
                 seed: int | None = None, seeds: list[int] | None = None) -> list[RolloutResult]:
        """n samples per prompt, prompt-major, with the sampled tokens' log-probs. seed: prompt i samples with
        seed + i (reproducible, yet independent streams); seeds: one seed per prompt instead."""
        from vllm import SamplingParams

        if not prompt_token_ids:
            return []
        seeds = _prompt_seeds(len(prompt_token_ids), seed, seeds)

        def params(s: int | None):
            return SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k if top_k > 0 else -1, stop_token_ids=list(stop_token_ids or []),
                                  logprobs=0, seed=s, detokenize=False)
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompt_token_ids]
        sampling = params(None) if seeds is None else [params(s) for s in seeds]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        results = []
        for i, out in enumerate(outputs):
            for comp in sorted(out.outputs, key=lambda c: c.index):
                toks = list(comp.token_ids)
                lps = [float(step[t].logprob) for t, step in zip(toks, comp.logprobs or [])]
                reason = "stop" if comp.finish_reason == "stop" else "length"
                results.append(RolloutResult(i, toks, lps, reason))
        return results

    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-prob of every token after the first of each sequence (prompt log-probs):
        to check the engine against the trainer on fixed sequences."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(map(int, s))} for s in token_ids], params, use_tqdm=False)
        return [[float(step[t].logprob) for t, step in zip(seq[1:], out.prompt_logprobs[1:])]
                for seq, out in zip(token_ids, outs)]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push (name, tensor) pairs (transformers naming; all of the model or only some of its layers) into the
        running engine, then drop the prefix cache so no KV computed with the old weights is reused.

        Tensors travel in collective_rpc calls of at most `bucket_bytes` each and are applied as they arrive
        (engine/rollout/vllm_sync.py): copied in place, in the engine's dtype, into the engine's storage (the
        fused qkv / gate-up slices, the embedding shared with a tied LM head), learnt from vLLM's own loader
        the first time a name is synced. Layers the engine repacks (vLLM's CPU backend with
        cpu_packed_gemm=True) are held until the end and go through vLLM's layer-wise reload, which needs
        each such layer whole. `last_sync` says which names took which path."""
        for bucket in buckets(((n, t.detach()) for n, t in named_tensors), self.bucket_bytes):
            self.llm.collective_rpc("rlhf_engine_receive_weights", args=(bucket,))
        self.last_sync = self.llm.collective_rpc("rlhf_engine_apply_weights")[0]
        self.llm.reset_prefix_cache()

    def held_bytes(self) -> int:
        """Bytes of weights this process's engine worker holds (its tensor-parallel slice)."""
        return int(self.llm.collective_rpc("rlhf_engine_held_bytes")[0])

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory for training (needs enable_sleep_mode=True)."""
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
