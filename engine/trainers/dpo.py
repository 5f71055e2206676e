"""Direct preference optimisation on ranked comparisons: DPO, IPO and listwise (Plackett-Luce) DPO.

Each batch element is one prompt with all its K ranked responses (K = 2 for chosen/rejected pairs), as for
the reward model: the K sequences of every prompt go through the policy in one forward, whose log-probs come
from the fused LM-head kernel (`PolicyLogprobs`, no [tokens x vocab] logits), and `kernels.preference_loss`
scores the whole ranking. The reference's sequence log-probs are computed once per comparison, the first
time it is drawn, from that comparison's K responses alone (so the value never depends on which batch it was
first met in, and a resumed run recomputes exactly what the uninterrupted one used).
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from kernels import preference_loss, sequence_logps

from ..models.forward import PolicyLogprobs
from ..models.loading import placed
from ..models.lora import plain
from ..models.sharding import shard
from ..parallel import distributed as dist
from ..rundir.atomic import write_text_atomic
from ..rundir.final import save_models
from .loop import run_steps
from .reward import comparison_batch, n_pairs, per_prompt
from .state import open_stage, saved_model, train_one

log = logging.getLogger("engine")


def comparison_logps(policy: PolicyLogprobs, rows: list[dict], pad_id: int, length_norm: bool = False):
    """The sequence log-prob of every response of every prompt, in one forward -> (logps [B, Kmax], ranks
    [B, Kmax], valid [B, Kmax]). rows: {prompt, responses, ranks} of token ids (ranks: 0 = best)."""
    batch = comparison_batch(rows, pad_id, next(policy.parameters()).device)
    return per_prompt(sequence_logps(policy(batch), batch.response_mask, length_norm), rows)


class ReferenceLogps:
    """The reference's sequence log-probs of each comparison's responses, computed once, on first use. Under
    FSDP every process must ask for the same rows in the same order (each new row is a collective forward).

    reference: a PolicyLogprobs of the frozen model, or None with `policy` given: the policy with its LoRA
    adapters disabled (the base weights are the reference, held once). reference_free: zeros (SimPO-style)."""

    def __init__(self, rows, pad_id: int, *, reference=None, policy=None, length_norm=False, reference_free=False):
        self.rows, self.pad_id, self.length_norm = rows, pad_id, length_norm
        self.reference, self.policy, self.free = reference, policy, reference_free
        self.cache: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, idx: list[int], kmax: int) -> torch.Tensor:
        """[len(idx), kmax] reference log-probs of rows[idx] (0 past each row's K)."""
        out = torch.zeros(len(idx), kmax)
        if self.free:
            return out
        for b, i in enumerate(idx):
            if i not in self.cache:
                self.cache[i] = self._compute(self.rows[i])
            out[b, :len(self.cache[i])] = self.cache[i]
        return out

    def _compute(self, row: dict) -> torch.Tensor:
        model = self.reference if self.reference is not None else self.policy
        was = model.training
        model.eval()
        try:
            with nullcontext() if self.reference is not None else model.lm.disable_adapter():
                logps = comparison_logps(model, [row], self.pad_id, self.length_norm)[0]
        finally:
            model.train(was)
        return logps[0].float().cpu()


def preference_accuracy(policy: PolicyLogprobs, ref: ReferenceLogps, rows: list[dict], pad_id: int, cfg,
                        chunk: int = 32) -> dict:
    """The loss and the fraction of ranked pairs the implicit rewards order like the labeler, over `rows`
    (every pair counted once; the reference's log-probs from `ref`, which must cover the same rows)."""
    was = policy.training
    policy.eval()
    right = total = loss_sum = prompts = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), chunk):
            part = list(range(i, min(i + chunk, len(rows))))
            logps, ranks, valid = comparison_logps(policy, [rows[j] for j in part], pad_id, cfg.length_norm)
            z = logps - ref(part, logps.shape[1]).to(logps.device)
            loss, stats = preference_loss(z, ranks, valid, loss=cfg.loss, beta=cfg.beta,
                                          label_smoothing=cfg.label_smoothing)
            pairs = sum(n_pairs(rows[j]) for j in part)
            right += stats["accuracy"] * pairs
            total += pairs
            with_pairs = sum(n_pairs(rows[j]) > 0 for j in part)
            loss_sum += loss.item() * with_pairs
            prompts += with_pairs
    policy.train(was)
    return {"accuracy": right / max(total, 1), "loss": loss_sum / max(prompts, 1)}


def train_dpo(ctx, load_policy, reference, cfg, rows: list[dict], heldout: list[dict] | None = None) -> Path:
    """Train the policy on ranked `rows` ({prompt, responses, ranks}: token ids, ranks 0 = best) with
    cfg.loss; returns the final policy directory (OUT/<cfg.stage>/final/policy). cfg: DPOConfig.

    load_policy(resume): the policy, from a checkpoint's model directory or (None) from the SFT model.
    reference: the frozen reference model (a transformers causal LM), or None: the policy with its LoRA
    adapters disabled, or nothing at all with cfg.reference_free. heldout: comparisons for eval.json.
    """
    stage = cfg.stage
    stage_dir, final, ckpt = open_stage(ctx, stage, "policy")
    if final.is_dir():
        log.info("%s: already done (%s)", stage, final)
        return final
    if not rows:
        raise ValueError(f"{stage}: no comparisons to train on (every one was dropped by the length rule?)")
    dist.require_rows(cfg.batch_size, "the batch of prompts", "--dpo.batch_size")
    pad, device = ctx.tokenizer.pad_token_id, ctx.device
    heads = dict(backend=cfg.backend, fused=ctx.cfg.run.fused_lm_head)
    model = placed(load_policy(saved_model(ckpt, "policy")), device).train()
    policy = shard(PolicyLogprobs(model, **heads))
    ref_model = None if reference is None else shard(PolicyLogprobs(reference, **heads),
                                                          offload=ctx.cfg.run.offload_frozen)
    ref_kw = dict(reference=ref_model, policy=policy, length_norm=cfg.length_norm, reference_free=cfg.reference_free)
    ref = ReferenceLogps(rows, pad, **ref_kw)
    optim, state, start = train_one(stage_dir, "policy", model, cfg, "--dpo.lr", ctx.tokenizer, ckpt)

    def step_fn(step: int, gen: torch.Generator) -> dict:
        idx = torch.randint(0, len(rows), (cfg.batch_size,), generator=gen).tolist()
        positions = dist.rows(len(idx))
        mine = [idx[i] for i in positions]  # this process's prompts of the global batch
        # every process computes the reference of the whole batch's new rows (the same forwards in the same
        # order, as FSDP's collectives need), once per comparison
        ref_all = ref(idx, max(len(rows[i]["responses"]) for i in idx))
        logps, ranks, valid = comparison_logps(policy, [rows[i] for i in mine], pad, cfg.length_norm)
        z = logps - ref_all[positions, :logps.shape[1]].to(device)
        loss, stats = preference_loss(z, ranks, valid, loss=cfg.loss, beta=cfg.beta,
                                      label_smoothing=cfg.label_smoothing)
        pairs, all_pairs = [n_pairs(rows[i]) for i in mine], [n_pairs(rows[i]) for i in idx]
        # the loss is a mean over prompts that have a pair, the accuracy and margin means over pairs
        loss = dist.part(loss, sum(p > 0 for p in pairs), sum(p > 0 for p in all_pairs))
        optim.zero_grad()
        dist.backward(loss)
        grad_norm = optim.step()
        share = sum(pairs) / max(sum(all_pairs), 1)
        shares = dist.all_sum({"loss": loss.item(), "accuracy": stats["accuracy"] * share,
                               "margin": stats["margin"] * share})
        return {**shares, "grad_norm": grad_norm, "lr": optim.current_lr}

    run_steps(stage=stage, seed=ctx.cfg.run.seed, start=start, total=cfg.steps, step_fn=step_fn, state=state,
              log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, progress=ctx.cfg.run.progress,
              lr=cfg.lr)
    result = {"loss": cfg.loss, "beta": cfg.beta, "label_smoothing": cfg.label_smoothing,
              "length_norm": cfg.length_norm, "reference_free": cfg.reference_free}
    if heldout:
        held_ref = ReferenceLogps(heldout, pad, **ref_kw)
        result.update({f"heldout_{k}": v for k, v in preference_accuracy(policy, held_ref, heldout, pad, cfg).items()})
    write_text_atomic(stage_dir / "eval.json", json.dumps(result, indent=2))
    log.info("%s: %s", stage, result)
    save_models(stage_dir / "final", {"policy": plain(model)}, ctx.tokenizer)
    return final
