"""The smallest change that makes a job fit: the settings tried in order of what they cost the job, each kept
once taken, until the per-rank peak fits in --gpu_mem:

1. gradient checkpointing (a block recomputed in backward: about a third more compute in training passes)
2. the frozen models' weights on the CPU (FSDP2's CPUOffloadPolicy: copies over PCIe for their passes)
3. vLLM tensor parallelism, doubled up to a node's GPUs (the engine split; more communication per token)
4. fewer rollout sequences at once, halved down to 16 (generation less batched)
5. smaller micro-batches, halved down to 512 tokens (more optimizer micro-steps per batch)
6. more nodes, doubled up to 64x the given count (the cost is the hardware): the fewest nodes come first
"""
from __future__ import annotations

from .estimate import Estimate, engine_tp_problem, estimate
from .settings import PlanSettings


def _moves(s: PlanSettings, policy_config):
    """(what changed, the new settings) for each next step from `s`, in order of cost; None when exhausted. A
    tensor-parallel degree vLLM cannot split the policy's heads over is skipped."""
    if not s.gradient_checkpointing:
        yield "gradient checkpointing", s.but(gradient_checkpointing=True)
    if s.stage in ("dpo", "ppo", "grpo") and s.device == "cuda" and not s.offload_frozen:
        yield "frozen models offloaded to the CPU", s.but(offload_frozen=True)
    if s.stage in ("ppo", "grpo") and s.engine == "vllm" and s.engine_tp * 2 <= s.gpus_per_node \
            and engine_tp_problem(policy_config, s.engine_tp * 2) is None:
        yield f"vLLM tensor parallel {s.engine_tp * 2}", s.but(engine_tp=s.engine_tp * 2)
    if s.stage in ("ppo", "grpo") and s.rollout_sequences // 2 >= 16:
        yield f"{s.rollout_sequences // 2} rollout sequences at once", s.but(rollout_sequences=s.rollout_sequences // 2)
    if s.micro_batch_tokens // 2 >= 512:
        yield f"micro-batches of {s.micro_batch_tokens // 2} tokens", s.but(micro_batch_tokens=s.micro_batch_tokens // 2)


def smallest_fit(s: PlanSettings, cache: dict | None = None, max_nodes_factor: int = 64) -> tuple[Estimate, list[str]]:
    """(the estimate of the settings found, the changes from `s`). For the fewest nodes (doubling) at which
    the moves above make the job fit, the moves are taken in order until it fits, then each is undone again,
    the costliest first, as far as the job still fits. When nothing fits up to max_nodes_factor x the nodes,
    the last settings tried (estimate.fits is False)."""
    cache = {} if cache is None else cache
    nodes = s.nodes
    while True:
        est = estimate(s.but(nodes=nodes), cache)
        for _ in range(64):
            move = next(_moves(est.settings, cache[("config", s.policy)]), None)
            if est.fits or move is None:
                break
            est = estimate(move[1], cache)
        if est.fits:
            est = _relax(est, s, cache)
            return est, _changes(s, est.settings)
        if nodes * 2 > s.nodes * max_nodes_factor:
            return est, _changes(s, est.settings)
        nodes *= 2


RELAX = ("micro_batch_tokens", "rollout_sequences", "engine_tp", "offload_frozen", "gradient_checkpointing")


def _relax(est: Estimate, original: PlanSettings, cache: dict) -> Estimate:
    """Each setting the moves changed stepped back toward `original`, costliest first, while the job fits."""
    for name in RELAX:
        while getattr(est.settings, name) != getattr(original, name):
            now, goal = getattr(est.settings, name), getattr(original, name)
            back = goal if isinstance(goal, bool) else (now * 2 if now < goal else now // 2)
            trial = estimate(est.settings.but(**{name: back}), cache)
            if not trial.fits:
                break
            est = trial
    return est


def _changes(original: PlanSettings, found: PlanSettings) -> list[str]:
    words = {"nodes": "{} nodes", "gradient_checkpointing": "gradient checkpointing",
             "offload_frozen": "frozen models offloaded to the CPU", "engine_tp": "vLLM tensor parallel {}",
             "rollout_sequences": "{} rollout sequences at once", "micro_batch_tokens": "micro-batches of {} tokens"}
    return [text.format(getattr(found, name)) for name, text in words.items()
            if getattr(found, name) != getattr(original, name)]
