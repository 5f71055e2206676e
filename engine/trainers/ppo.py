"""PPO against the reward model (InstructGPT section 3.5), PPO-ptx, and the critic-free estimators (GRPO,
Dr. GRPO, RLOO, REINFORCE++, with DAPO's loss options) on the same loop.

One iteration (`ppo_iteration`, read it top to bottom): sample prompts and generate n answers each with the
current policy, and score them (the RM and/or a reward function; with drop_constant_groups, groups that all
score the same are dropped and refilled, DAPO's dynamic sampling); per-token log-probs of the policy (old)
and of the SFT reference, and values (with a critic); shaped rewards (`kernels.shape_rewards`: the score at
the last token minus beta * KL to the SFT model); advantages by the configured estimator
(`kernels.estimate_advantages`: the one place it is chosen); several epochs of minibatches with the clipped
policy loss (+ the clipped value loss with a critic, + GRPO's KL term, + gamma times the pretraining LM loss
for PPO-ptx); the new weights into the rollout engine; beta adapts (`KLController`). The value model starts
as the RM.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import kernels
from kernels import kl_loss, masked_mean, policy_loss, value_loss

from .. import distributed as dist
from ..batch import SequenceBatch, make_batch
from ..checkpoint import save_models
from ..kl_control import KLController
from ..lora import is_peft, merged_named_weights, plain
from ..loading import placed
from ..models import PolicyLogprobs, TokenValues
from ..rollout import make_rollout, resolve_backend
from ..rollout.async_engine import EngineSpec
from ..seeds import rollout_seeds
from .async_ppo import Pipeline, check_async
from .lm import lm_loss_part
from .loop import run_steps
from .passes import needs_reference, old_logprobs_source
from .optim import Optim
from .phases import Phases, no_phases
from .state import TrainState, open_stage, saved_model

log = logging.getLogger("engine")


@dataclass
class Experience:
    """One iteration's rollouts; every [B, R] tensor is aligned with batch.response_mask."""
    batch: SequenceBatch
    old_logprobs: torch.Tensor | None  # [B, R] policy at sampling time (None: taken from the update's forward)
    ref_logprobs: torch.Tensor | None  # [B, R] SFT reference (None: nothing reads it, the pass is skipped)
    old_values: torch.Tensor     # [B, R] (zeros without a critic)
    scores: torch.Tensor         # [B] reward of each whole answer
    rewards: torch.Tensor        # [B, R] shaped
    kl: torch.Tensor | None      # [B, R] per-token KL estimate (None until both log-probs are known)
    advantages: torch.Tensor     # [B, R]
    returns: torch.Tensor | None  # [B, R] the value loss's target (GAE only)
    engine_logprobs: torch.Tensor | None = None  # [B, R] what the rollout engine reported when sampling


@torch.no_grad()
def make_experience(policy: PolicyLogprobs, ref: PolicyLogprobs | None, value: TokenValues | None,
                    batch: SequenceBatch, scores: torch.Tensor, *, kl_coef: float, cfg, temperature: float,
                    phase=no_phases, use_ref: bool = True, old: str = "trainer",
                    engine_lp: torch.Tensor | None = None) -> Experience:
    """Log-probs, values, rewards and advantages of one batch of scored rollouts. cfg: PPOConfig.

    ref: the frozen SFT policy, or None for the policy with its LoRA adapters disabled (one base in memory).
    use_ref=False: no reference pass (nothing reads it; kl_coef must be 0). value: the critic, or None for a
    critic-free estimator. scores [B]: each answer's reward; rows are prompt-major, cfg.samples_per_prompt per
    prompt. old: where the old log-probs come from (`old_logprobs_source`); "engine" takes `engine_lp` [B, R].
    phase(name): a context timing each part (engine.trainers.phases.Phases).
    """
    if not use_ref and kl_coef:
        raise ValueError("make_experience: a KL penalty (kl_coef > 0) needs the reference's log-probs")
    was = policy.training, value is not None and value.training
    policy.eval()
    mask, n = batch.response_mask, batch.input_ids.shape[0]

    def per_rank(model, **kw):  # each process its rows; the [B, R] result gathered onto every process
        return dist.map_rows(lambda ix: model(batch.select(ix), **kw), n)
    old_lp = ref_lp = None
    if old == "trainer":
        with phase("logprobs"):
            old_lp = per_rank(policy, temperature=temperature)
    elif old == "engine":
        old_lp = engine_lp
    if use_ref:
        with phase("ref_logprobs"):
            if ref is None:
                with policy.lm.disable_adapter():
                    ref_lp = per_rank(policy, temperature=temperature)
            else:
                ref_lp = per_rank(ref, temperature=temperature)
    values = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if value is not None:
        with phase("values"):
            value.eval()
            values = per_rank(value) * mask
            value.train(was[1])
    with phase("advantages"):
        # Without a KL penalty the rewards are the scores at each answer's last token, whatever the log-probs.
        lp = old_lp if old_lp is not None and ref_lp is not None else values.new_zeros(mask.shape)
        rewards, kl = kernels.shape_rewards(scores, lp, ref_lp if lp is old_lp else lp, mask, kl_coef=kl_coef,
                                            estimator=cfg.kl_estimator, backend=cfg.backend)
        adv, ret = kernels.estimate_advantages(cfg.advantage_estimator, rewards, mask, values=values,
                                               n=cfg.samples_per_prompt, gamma=cfg.gamma, lam=cfg.lam,
                                               whiten=cfg.whiten_advantages, backend=cfg.backend)
    policy.train(was[0])
    return Experience(batch, old_lp, ref_lp, values, scores, rewards, kl if lp is old_lp else None, adv, ret,
                      engine_logprobs=engine_lp)


def _count(mask: torch.Tensor, loss_agg: str) -> float:
    """What a loss aggregation averages over: tokens (token-mean) or answers with a token."""
    return float(mask.sum() if loss_agg == "token-mean" else (mask.sum(1) > 0).sum())


def ppo_minibatch_loss(policy: PolicyLogprobs, value: TokenValues | None, exp: Experience, idx, cfg,
                       temperature: float, ptx: Callable[[], torch.Tensor] | None = None, norm_len: float | None = None,
                       whole=None, record: list | None = None):
    """Loss of one minibatch: the clipped policy loss (+ vf_coef * the clipped value loss with a critic,
    + kl_loss_coef * KL to the reference, + ptx_coef * the LM loss). norm_len: the constant of
    loss_agg="seq-mean-token-sum-norm" (the longest answer allowed).

    whole: the rows of the global minibatch when `idx` is this process's share of it (engine.distributed):
    each term and statistic is then this process's part of the global one (the parts sum to it); ptx()
    returns its own part. None: idx is the whole minibatch. record: a list to append (idx, the policy's
    detached log-probs of those rows) to."""
    mb = exp.batch.select(idx)
    mask = mb.response_mask
    whole_mask = mask if whole is None else exp.batch.response_mask[whole]

    def part(x, agg="token-mean"):
        return dist.part(x, _count(mask, agg), _count(whole_mask, agg))
    lp, ent = policy(mb, temperature, return_entropy=True)
    # on-policy (one update from the sampling policy): the old log-probs are this forward's, detached
    old = exp.old_logprobs[idx] if exp.old_logprobs is not None else lp.detach()
    is_weights, is_stats = None, {}
    correction = off_policy(cfg)
    if correction is not None and exp.engine_logprobs is not None:
        # The samples came from the engine's distribution (another numerics, or with max_staleness an older
        # policy), the clip is around the trainer's policy at the update's start: reweight by pi_old / pi_engine
        is_weights, is_stats = kernels.off_policy_weights(old, exp.engine_logprobs[idx], mask, mode=correction[0],
                                                          cap=correction[1])
    pg, pg_stats = policy_loss(lp, old, exp.advantages[idx], mask, cfg.clip_eps,
                               is_weights=is_weights, clip_high=cfg.clip_high or None, loss_agg=cfg.loss_agg,
                               norm_len=norm_len)
    loss = part(pg, cfg.loss_agg)
    stats = {"pg_loss": loss.item(), "entropy": part(masked_mean(ent, mask)).item(),
             **{k: part(v) for k, v in pg_stats.items()}, **{k: part(v) for k, v in is_stats.items()}}
    if record is not None:  # this forward's log-probs of rows idx (the on-policy update's old log-probs)
        record.append((idx, lp.detach()))
    if value is not None:
        vf, vf_stats = value_loss(value(mb), exp.old_values[idx], exp.returns[idx], mask, cfg.value_clip_eps)
        vf = part(vf)
        loss = loss + cfg.vf_coef * vf
        stats.update(vf_loss=vf.item(), **{k: part(v) for k, v in vf_stats.items()})
    if cfg.kl_loss_coef > 0:
        kl, _ = kl_loss(lp, exp.ref_logprobs[idx], mask, estimator=cfg.kl_loss_estimator,
                        loss_agg=cfg.loss_agg, norm_len=norm_len)
        kl = part(kl, cfg.loss_agg)
        loss = loss + cfg.kl_loss_coef * kl
        stats["kl_loss"] = kl.item()
    if ptx is not None:
        ptx_loss = ptx()
        loss = loss + cfg.ptx_coef * ptx_loss
        stats["ptx_loss"] = ptx_loss.item()
    return loss, stats


def off_policy(cfg) -> tuple[str, float] | None:
    """(correction, cap) of the importance weights to the rollout engine, or None. cfg: PPOConfig. With
    max_staleness > 0 always (off_policy_correction, tis_cap or 2); otherwise TIS when tis_cap > 0."""
    if cfg.max_staleness > 0:
        return cfg.off_policy_correction, cfg.tis_cap or 2.0
    return ("tis", cfg.tis_cap) if cfg.tis_cap > 0 else None


def engine_logprobs(results, like: torch.Tensor) -> torch.Tensor:
    """The rollout engine's log-probs of the sampled tokens as a [B, R] float32 tensor shaped like `like` (the
    response mask), on its device."""
    eng = torch.zeros(like.shape, dtype=torch.float32)
    for i, r in enumerate(results):
        lps = r.logprobs[: like.shape[1]]
        eng[i, :len(lps)] = torch.as_tensor(lps, dtype=torch.float32)
    return eng.to(like.device)


def engine_mismatch(eng, old_lp, mask) -> dict:
    """|logp_engine - logp_trainer| over sampled tokens, and the share of ratios outside [0.9, 1.1]."""
    diff = (eng - old_lp).abs()[mask]
    ratio = torch.exp(old_lp - eng)[mask]
    return {"logprob_diff_mean": diff.mean().item(), "logprob_diff_max": diff.max().item(),
            "ratio_outside_0.9_1.1": ((ratio < 0.9) | (ratio > 1.1)).float().mean().item()}


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
    evaluate: Callable | None = None       # evaluate(policy) -> win rate against the SFT policy
    engine_dtype: str | None = None        # the rollout engine's weights; None: the policy's


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


def ppo_iteration(run: PPORun, step: int, gen: torch.Generator) -> dict:
    """One PPO iteration; returns its metrics."""
    cfg, rcfg, setup, phase = run.cfg, run.rollout_cfg, run.setup, run.phases
    if run.pipeline is None:
        rollouts = collect_rollouts(run, step, gen)
    else:
        with phase("wait"):  # the trainer idle until the engine process has the batch
            idx, version, results, engine_s = run.pipeline.take(step)
        rollouts = score_rollouts(run, step, [idx[r.prompt_index] for r in results], results)
    with engine_asleep(run):
        eng = engine_logprobs(rollouts.results, rollouts.batch.response_mask)
        exp = make_experience(run.policy, run.ref, run.value, rollouts.batch, rollouts.scores, kl_coef=run.kl.coef,
                              cfg=cfg, temperature=rcfg.temperature, phase=phase, use_ref=needs_reference(cfg),
                              old=old_logprobs_source(cfg), engine_lp=eng)
        with phase("update"):
            stats = ppo_update(run, exp, gen)
    with phase("sync"):
        if run.pipeline is None:
            sync_weights(run)
        else:  # into shared memory, and the next batch asked for
            run.pipeline.advance(step, merged_named_weights(run.policy.lm))
    metrics = iteration_metrics(exp, rollouts.results, stats, run.kl.coef, cfg.kl_estimator)
    if run.pipeline is not None:
        metrics.update(policy_version=version, staleness=step - version, engine_generate_s=engine_s)
    if hasattr(run.engine, "held_bytes"):  # what this rank's rollout engine holds (1/TP of the policy)
        metrics["engine_weights_mib"] = run.engine.held_bytes() / 2**20
    rows, width = exp.batch.input_ids.shape  # this rank's padded tokens in one minibatch's pass
    metrics["padded_tokens_per_rank"] = len(dist.rows(min(cfg.minibatch, rows))) * width
    if cfg.drop_constant_groups:
        metrics.update(groups_dropped=rollouts.groups_dropped, answers=len(rollouts.results))
    if "kl" in metrics:
        run.kl.update(metrics["kl"], len(rollouts.results))
    if setup.evaluate is not None and ((step + 1) % cfg.eval_every == 0 or step == 0) and run.plain_policy():
        with phase("evaluate"):  # every process evaluates the same whole policy the same way
            metrics["win_rate_vs_sft"] = setup.evaluate(run.plain_policy())
    metrics.update(phase.pop())
    return metrics


@dataclass
class Rollouts:
    """One iteration's scored answers, prompt-major (samples_per_prompt per prompt)."""
    results: list                          # RolloutResult of each answer
    batch: SequenceBatch
    scores: torch.Tensor                   # [B] each answer's reward
    groups_dropped: int = 0


MAX_ROUNDS = 8  # dynamic sampling gives up refilling after this many rounds (and trains on what it has)


def collect_rollouts(run: PPORun, step: int, gen: torch.Generator) -> Rollouts:
    """rollout_batch prompts with samples_per_prompt answers each, scored. With drop_constant_groups (DAPO's
    dynamic sampling), a prompt whose answers all score the same teaches a group estimator nothing: it is
    dropped and more prompts are sampled until rollout_batch prompts are kept (at most MAX_ROUNDS rounds)."""
    cfg, setup, phase = run.cfg, run.setup, run.phases
    n, kept, dropped = cfg.samples_per_prompt, [], 0
    for round_ in range(MAX_ROUNDS if cfg.drop_constant_groups else 1):
        idx = torch.randint(0, len(setup.prompts), (cfg.rollout_batch,), generator=gen).tolist()
        with phase("generate"):
            results = generate(run, idx, seeds=rollout_seeds(run.seed, run.stage, step, round_, len(idx)))
        rows = [idx[r.prompt_index] for r in results]
        scored = score_rollouts(run, step, rows, results)
        if not cfg.drop_constant_groups:
            return scored
        scores = scored.scores
        groups = scores.view(-1, n)
        live = (groups != groups[:, :1]).any(dim=1).tolist()
        dropped += live.count(False)
        kept += [(rows[g * n:(g + 1) * n], results[g * n:(g + 1) * n], groups[g]) for g, ok in enumerate(live) if ok]
        if len(kept) >= cfg.rollout_batch:
            break
    if not kept:  # every group scored flat: train on the last round (its advantages are zero)
        kept = [(rows[g * n:(g + 1) * n], results[g * n:(g + 1) * n], groups[g]) for g in range(cfg.rollout_batch)]
    kept = kept[:cfg.rollout_batch]
    rows = [i for group in kept for i in group[0]]
    results = [r for group in kept for r in group[1]]
    batch = make_batch([setup.prompts[i] for i in rows], [r.token_ids for r in results], run.pad_id).to(run.device)
    return Rollouts(results, batch, torch.cat([group[2] for group in kept]), dropped)


def score_rollouts(run: PPORun, step: int, rows: list[int], results: list) -> Rollouts:
    """The answers `results` to prompts `rows` (one prompt index per answer) batched and scored."""
    setup = run.setup
    batch = make_batch([setup.prompts[i] for i in rows], [r.token_ids for r in results], run.pad_id).to(run.device)
    with run.phases("score"):  # each process scores its rows (the RM's forward is sharded)
        scores = dist.map_rows(lambda ix: setup.score(batch.select(ix), [rows[i] for i in ix],
                                                      [results[i] for i in ix]).to(run.device), len(rows))
    check_scores(scores, step, [setup.prompts[i] for i in rows])
    return Rollouts(results, batch, scores)


def check_scores(scores: torch.Tensor, step: int, prompts: list) -> None:
    """A non-finite reward (a broken reward model: the functions' results are checked where they return) stops
    the run naming the answer, before it reaches the advantages as NaN."""
    bad = torch.nonzero(~torch.isfinite(scores)).flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(f"ppo: iteration {step + 1}: the reward of answer {i} (prompt {str(prompts[i])[:80]!r}) is "
                         f"{scores[i].item()} ({len(bad)} of {len(scores)} non-finite): the reward model gives "
                         f"non-finite scores. Check --reward.path (its weights, and its dtype for long answers).")


def generate(run: PPORun, idx: list[int], *, seeds: list[int]) -> list:
    """Answers to prompts `idx` (samples_per_prompt each, prompt-major), each process generating for its share
    of the prompts with its own engine. Prompt k of the call samples with seeds[k] whichever process holds
    it, so the answers do not depend on the number of processes."""
    cfg, rcfg = run.cfg, run.rollout_cfg
    mine = dist.rows(len(idx), rcfg.tensor_parallel)  # a tensor-parallel engine's ranks share their prompts
    results = run.engine.generate([run.setup.prompts[idx[k]] for k in mine], n=cfg.samples_per_prompt,
                                  max_tokens=rcfg.max_new_tokens, temperature=rcfg.temperature, top_p=rcfg.top_p,
                                  top_k=rcfg.top_k, seeds=[seeds[k] for k in mine])
    groups = [[] for _ in mine]
    for r in results:  # prompt_index: the call's local index, made the global one
        groups[r.prompt_index].append(r)
        r.prompt_index = mine[r.prompt_index]
    return [r for group in dist.gather_objects(groups, rcfg.tensor_parallel) for r in group]


def ppo_update(run: PPORun, exp: Experience, gen: torch.Generator) -> dict[str, list]:
    """cfg.epochs passes over the rollouts in minibatches; each minibatch one step of both optimizers. Every
    process draws the same global minibatches and computes its share of each one's rows."""
    cfg = run.cfg
    ptx = (lambda: ptx_loss(run, gen)) if run.ptx else None
    stats: dict[str, list] = {}
    record = [] if exp.old_logprobs is None else None
    for _ in range(cfg.epochs):
        for mb in torch.randperm(exp.batch.input_ids.shape[0], generator=gen).split(cfg.minibatch):
            mb = mb.to(run.device)
            loss, s = ppo_minibatch_loss(run.policy, run.value, exp, mb[dist.rows(len(mb))], cfg,
                                         run.rollout_cfg.temperature, ptx, norm_len=run.rollout_cfg.max_new_tokens,
                                         whole=mb, record=record)
            for optim in run.optims.values():
                optim.zero_grad()
            dist.backward(loss)
            for optim in run.optims.values():
                optim.step()
            s["loss"] = loss.item()
            for k, v in dist.all_sum(s).items():
                stats.setdefault(k, []).append(v)
    if record is not None:  # the old log-probs the update used, [B, R] on every process (for the metrics)
        mask = exp.batch.response_mask
        old = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for idx, lp in record:
            old[idx] = lp.to(old.dtype)
        exp.old_logprobs = dist.sum_rows(old)
    return stats


def ptx_loss(run: PPORun, gen: torch.Generator) -> torch.Tensor:
    """PPO-ptx: the LM loss on a batch of pretraining text (this process's part of it)."""
    corpus = run.setup.ptx_examples
    idx = torch.randint(0, len(corpus), (run.cfg.ptx_batch,), generator=gen).tolist()
    return lm_loss_part(run.policy, corpus, idx, run.pad_id)


@contextlib.contextmanager
def engine_asleep(run: PPORun):
    """vLLM colocated on a GPU with sleep mode: its weights and KV cache leave the GPU while the trainer runs."""
    if run.engine_sleeps:
        run.engine.sleep(level=1)
    try:
        yield
    finally:
        if run.engine_sleeps:
            run.engine.wake_up()


def sync_weights(run: PPORun) -> None:
    """The HF backend samples from the policy object itself; an engine gets the merged weights, with several
    processes gathered one tensor at a time from the shards (a collective: every process pushes into its own
    engine)."""
    if getattr(run.engine, "model", None) is not run.policy.lm:
        run.engine.update_weights(dist.full_named(merged_named_weights(run.policy.lm)))


def iteration_metrics(exp: Experience, results, stats: dict[str, list], kl_coef: float, estimator: str) -> dict:
    """The iteration's means. "kl" (to the reference, per sequence) only when the reference ran."""
    mask = exp.batch.response_mask
    m = {k: sum(v) / len(v) for k, v in stats.items()}
    kl = exp.kl
    if kl is None and exp.ref_logprobs is not None:  # the old log-probs came from the update's forward
        kl = kernels.kl_penalty(exp.old_logprobs, exp.ref_logprobs, estimator=estimator)
    if kl is not None:
        m["kl"] = (kl * mask).sum(1).mean().item()
    m.update(score=exp.scores.mean().item(), kl_coef=kl_coef,
             reward=(exp.rewards * mask).sum(1).mean().item(), response_len=mask.sum(1).float().mean().item(),
             finished=sum(r.finish_reason == "stop" for r in results) / len(results))
    if exp.old_logprobs is not exp.engine_logprobs:  # (taken from the engine, they are its own)
        m.update(engine_mismatch(exp.engine_logprobs, exp.old_logprobs, mask))
    return m


def make_ppo_run(ctx, setup: PPOSetup, policy_model, value_model, *, ptx: bool) -> PPORun:
    """Everything an iteration needs around the two trained models: their optimizers, beta, the reference and
    reward wrappers, and the rollout engine (started from setup.policy_dir). The benchmark of one iteration
    (bench/bench_ppo.py) builds its run here too."""
    cfg, rcfg, run_cfg = ctx.cfg.ppo, ctx.cfg.rollout, ctx.cfg.run
    tok, dev = ctx.tokenizer, ctx.device
    dist.require_rows(cfg.rollout_batch, "each iteration's prompts", "--ppo.rollout_batch")
    dist.require_rows(cfg.minibatch, "each minibatch", "--ppo.minibatch")
    heads = dict(backend=cfg.backend, fused=run_cfg.fused_lm_head)
    stage = "ppo_ptx" if ptx else "ppo"
    engine_kw = dict(gpu_memory_utilization=rcfg.gpu_memory_utilization, enable_sleep_mode=rcfg.sleep) \
        if dev.type == "cuda" else dict(cpu_packed_gemm=rcfg.cpu_packed_gemm)
    if rcfg.tensor_parallel > 1:  # VLLMRollout checks it against the launch
        engine_kw["tensor_parallel"] = rcfg.tensor_parallel
    policy = dist.shard(PolicyLogprobs(policy_model, **heads))
    value = dist.shard(TokenValues(value_model)) if value_model is not None else None
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
                          rcfg.top_p, rcfg.top_k, engine_kw=engine_kw)
        pipeline = Pipeline(spec, merged_named_weights(policy_model), k=cfg.max_staleness, total=cfg.iterations,
                            stage=stage, seed=run_cfg.seed, rollout_batch=cfg.rollout_batch, prompts=setup.prompts,
                            placement=rcfg.engine_cores)
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


def train_ppo(ctx, setup: PPOSetup, *, ptx: bool) -> Path:
    """Run PPO (or PPO-ptx) from the SFT policy and the RM; returns the final policy directory."""
    stage = "ppo_ptx" if ptx else "ppo"
    stage_dir, final, ckpt = open_stage(ctx, stage, "policy")
    if final.is_dir():
        return final
    if ptx and not setup.ptx_examples:
        raise ValueError("ppo --ptx true needs pretraining text: give --data.pretrain FILE ({\"text\": ...} "
                         "records)")
    if not setup.prompts:
        raise ValueError("ppo: no prompts (every one was dropped by the length rule?)")
    policy_model = placed(setup.load_policy(saved_model(ckpt, "policy")), ctx.device).train()
    models = {"policy": policy_model}
    if setup.load_value is not None:  # a critic (GAE); the critic-free estimators train the policy alone
        models["value"] = placed(setup.load_value(saved_model(ckpt, "value")), ctx.device).train()
    run = make_ppo_run(ctx, setup, policy_model, models.get("value"), ptx=ptx)
    try:
        return _train(ctx, run, models, stage_dir, final, ckpt, ptx)
    finally:
        close_engine(run)


def close_engine(run: PPORun) -> None:
    for engine in (run.engine, run.pipeline):
        if engine is not None:
            engine.close()


def _train(ctx, run: PPORun, models: dict, stage_dir: Path, final: Path, ckpt: Path | None, ptx: bool) -> Path:
    cfg, run_cfg, stage, policy_model = ctx.cfg.ppo, ctx.cfg.run, run.stage, models["policy"]

    def extra() -> dict:  # with max_staleness, the batches already generated from older weights
        pending = {"async_pending": run.pipeline.pending_state()} if run.pipeline else {}
        return {"kl_coef": run.kl.coef, **pending}
    state = TrainState(stage_dir, models, run.optims, ctx.tokenizer, extra=extra)
    start, saved = 0, {}
    if ckpt is not None:
        saved = state.restore(ckpt)
        start = saved["step"]
        if cfg.adaptive_kl or saved["kl_coef"] == cfg.kl_coef:
            run.kl.coef = saved["kl_coef"]
        else:  # a fixed beta changed between runs is honoured
            log.warning("resuming with --ppo.kl_coef %g (the checkpoint was trained with %g)", cfg.kl_coef,
                        saved["kl_coef"])
    if run.pipeline is not None:
        run.pipeline.start(start, merged_named_weights(policy_model), saved.get("async_pending"))
    elif ckpt is not None or is_peft(policy_model):
        sync_weights(run)  # the engine started from the SFT weights
    run_steps(stage=stage, seed=run_cfg.seed, start=start, total=cfg.iterations,
              step_fn=lambda step, gen: ppo_iteration(run, step, gen), state=state, log_every=1,
              checkpoint_every=cfg.checkpoint_every, progress=run_cfg.progress, lr=cfg.lr)
    save_models(stage_dir / "final", {name: plain(m) for name, m in models.items()}, ctx.tokenizer)
    if dist.world().main:
        (stage_dir / "summary.json").write_text(json.dumps({"ptx": ptx, "kl_coef_final": run.kl.coef}, indent=2))
    return final
