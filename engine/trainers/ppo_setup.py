"""A PPO run's set-up: what the `ppo` stage hands the trainer (`PPOSetup`) and everything an iteration uses,
built once around the two trained models (`PPORun`, `make_ppo_run`): the sharded policy and value wrappers,
their optimizers, beta's controller, and the rollout engine (in this process, or in its own with
max_staleness > 0)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..models.forward import PolicyLogprobs, TokenValues
from ..models.lora import merged_named_weights
from ..models.sharding import shard
from ..parallel import distributed as dist
from ..rollout import make_rollout, resolve_backend
from ..rollout.async_engine import EngineSpec
from .async_ppo import Pipeline, check_async
from .kl_control import KLController
from .optim import Optim
from .phases import Phases


@dataclass
class PPOSetup:
    """What a PPO run trains and on what, built by the `ppo` stage (engine/stages.py).

    load_policy/load_value(resume): the model, from a checkpoint's model directory (full weights or LoRA
    adapters) or, with None, from where PPO starts (the SFT policy; the RM for the value model). load_value
    is None for a critic-free estimator.
    """
    load_policy: Callable
    load_value: Callable | None
    reference: PolicyLogprobs | None       # the frozen SFT policy, sharded; None: the policy without adapters
    score: Callable                        # score(batch, prompt index of each row, results) -> rewards [B]
    policy_dir: Path                       # the starting weights (a vLLM engine loads them)
    prompts: list[list[int]]               # prompt token ids
    ptx_examples: list | None = None       # (prompt ids, response ids) of pretraining text, for PPO-ptx
    max_model_len: int = 64                # prompt + response tokens
    evaluate: Callable | None = None       # evaluate(policy) -> {metric: value}: win rate against SFT, gold, proxy
    engine_dtype: str | None = None        # the rollout engine's weights; None: the policy's
    reward_spread: list | None = None      # an ensemble RM's members' std per answer scored, drained per iteration
    episodes: object | None = None         # engine.episodes.EpisodeTask: several turns with an environment


@dataclass
class PPORun:
    """Everything an iteration uses, built once by train_ppo. cfg: PPOConfig; rollout_cfg: RolloutConfig."""
    stage: str
    seed: int
    cfg: object
    rollout_cfg: object
    setup: PPOSetup
    policy: PolicyLogprobs
    ref: PolicyLogprobs | None
    value: TokenValues | None              # None: a critic-free estimator
    optims: dict[str, Optim]               # "policy" (and "value")
    kl: KLController
    engine: object                         # the rollout backend (engine.rollout)
    pad_id: int
    device: torch.device
    ptx: bool
    phases: Phases
    engine_sleeps: bool = False            # vLLM colocated on a GPU frees its memory during the trainer's passes
    sampler: torch.nn.Module | None = None  # the policy the HF backend samples from (None: vLLM's own)
    pipeline: Pipeline | None = None       # max_staleness > 0: the engine in its own process (engine is None)

    def plain_policy(self):
        """The policy to sample from outside the trainer's passes (the win-rate evaluation): the trained one
        (sharded with several processes, sampled through its wrapper); None with vLLM across processes."""
        return self.sampler if self.sampler is not None else (self.policy if dist.world().size == 1 else None)


def make_ppo_run(ctx, setup: PPOSetup, policy_model, value_model, *, ptx: bool) -> PPORun:
    """Everything an iteration needs around the two trained models: their optimizers, beta, the reference and
    reward wrappers, and the rollout engine (started from setup.policy_dir). The benchmark of one iteration
    (bench/bench_ppo.py) builds its run here too."""
    cfg, rcfg, run_cfg = ctx.cfg.ppo, ctx.cfg.rollout, ctx.cfg.run
    tok, dev = ctx.tokenizer, ctx.device
    dist.require_rows(cfg.rollout_batch, "each iteration's prompts", "--ppo.rollout_batch")
    dist.require_rows(cfg.minibatch, "each minibatch", "--ppo.minibatch")
    if setup.episodes is not None and dist.world().size > 1:
        # each rank's episodes end at their own turn, while a sharded policy's generate is a collective
        raise ValueError("--rollout.env/--rollout.tools with several processes (torchrun) is not built yet: the "
                         "ranks' episodes would end at different turns; run episodes in one process")
    heads = dict(backend=cfg.backend, fused=run_cfg.fused_lm_head)
    stage = "ppo_ptx" if ptx else "ppo"
    engine_kw = dict(gpu_memory_utilization=rcfg.gpu_memory_utilization, enable_sleep_mode=rcfg.sleep) \
        if dev.type == "cuda" else dict(cpu_packed_gemm=rcfg.cpu_packed_gemm)
    if rcfg.tensor_parallel > 1:  # VLLMRollout checks it against the launch
        engine_kw["tensor_parallel"] = rcfg.tensor_parallel
    policy = shard(PolicyLogprobs(policy_model, **heads))
    value = shard(TokenValues(value_model)) if value_model is not None else None
    # The HF backend samples from the trained policy itself (sharded with several processes: no rank holds it
    # whole, see HFRollout); vLLM holds its own copy, which every sync refreshes.
    backend = resolve_backend(rcfg.backend)
    dtype = setup.engine_dtype or str(next(policy_model.parameters()).dtype).split(".")[-1]
    sampler = policy if backend == "hf" and not cfg.max_staleness else None
    engine = pipeline = None
    if cfg.max_staleness:  # the engine in a process of its own, started from the same weights
        check_async(cfg, rcfg, dev)
        spec = EngineSpec(backend, str(setup.policy_dir), run_cfg.seed, tok.pad_token_id, tok.eos_token_id, dtype,
                          setup.max_model_len, cfg.samples_per_prompt, rcfg.max_new_tokens, rcfg.temperature,
                          rcfg.top_p, rcfg.top_k, engine_kw=engine_kw, episodes=setup.episodes)
        pipeline = Pipeline(spec, merged_named_weights(policy_model), k=cfg.max_staleness, total=cfg.iterations,
                            stage=stage, seed=run_cfg.seed, rollout_batch=cfg.rollout_batch, prompts=setup.prompts,
                            placement=rcfg.engine_cores, vocab=policy_model.config.vocab_size)
        pipeline.attach(policy, value, setup.reference)
    else:
        engine = make_rollout(backend, policy=sampler, model_dir=setup.policy_dir, seed=run_cfg.seed,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, dtype=dtype,
                              max_model_len=setup.max_model_len, **engine_kw)
    ref = setup.reference
    optim = dict(weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    optims = {"policy": Optim.adamw(policy_model, lr=cfg.lr, flag="--ppo.lr", **optim)}
    if value_model is not None:
        optims["value"] = Optim.adamw(value_model, lr=cfg.value_lr, flag="--ppo.value_lr", **optim)
    return PPORun(stage, run_cfg.seed, cfg, rcfg, setup, policy, ref, value, optims,
                  KLController.from_config(cfg), engine, tok.pad_token_id, dev, ptx,
                  Phases(dev), engine_sleeps=bool(engine_kw.get("enable_sleep_mode")) and hasattr(engine, "sleep"),
                  sampler=sampler, pipeline=pipeline)


def close_engine(run: PPORun) -> None:
    for engine in (run.engine, run.pipeline):
        if engine is not None:
            engine.close()
