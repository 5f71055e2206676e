"""Rollouts with transformers `generate()`: the backend where vLLM is absent."""
from __future__ import annotations

from typing import Iterable

import torch

import kernels

from ..models.forward import PolicyLogprobs, run_inside
from ..parallel import distributed as dist
from ..seeds import MASK, sample_seed
from .base import RolloutResult, prompt_seeds


class SampledLogprobs:
    """A logits processor that records the log-prob of each sampled token under softmax(logits / T) (top-p and
    top-k ignored: the trainer's view), one decoding step at a time with `kernels.token_logprobs`, so only one
    step's [N, V] logits are ever alive (not every step's, kept until the end, as output_logits would).

    generate() calls it with the raw logits before sampling step k; at call k + 1 the last column of input_ids
    is the token sampled at step k. `finish(last_tokens)` scores the final step -> [N, steps] float32.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0  # greedy: the raw logits' (as vLLM reports)
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(kernels.token_logprobs(self.prev, input_ids[:, -1], temperature=self.temperature))
        self.prev = scores
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self.steps.append(kernels.token_logprobs(self.prev, last_tokens, temperature=self.temperature))
        self.prev = None
        return torch.stack(self.steps, dim=1)


class SeededSampler:
    """A logits processor that turns generate()'s greedy pick into a sample from softmax(logits / T) cut by
    top-k and top-p (transformers' own warpers), by the Gumbel-max trick: argmax(logits / T + G) with G
    standard Gumbel noise. Each row draws its noise from its own generator, seeded by (its prompt's seed,
    its sample index), so a row's answer does not depend on which other rows share the batch.
    rows: (prompt seed, sample index) of each row, in batch order."""

    def __init__(self, temperature: float, top_p: float, top_k: int, rows: list[tuple[int, int]]):
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        self.temperature = temperature
        self.warpers = ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + \
                       ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        self.generators = [torch.Generator().manual_seed(sample_seed(s, j)) for s, j in rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return scores
        scores = scores.float() / self.temperature
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g) for g in self.generators]).clamp_(min=1e-20)
        return scores - torch.log(-torch.log(u)).to(scores.device)


def shared_prefill(model, ids: torch.Tensor, attn: torch.Tensor, n: int):
    """The KV cache of every prompt but its last token, computed once per prompt and repeated for its n samples
    (rows are prompt-major): the prefill costs 1/n of prefilling every row. generate() then feeds each row's
    last prompt token and decodes as usual. ids, attn: [P * n, L] left-padded."""
    uniq, mask = ids[::n, :-1], attn[::n, :-1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them from the mask
    cache = model(input_ids=uniq, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
    cache.batch_repeat_interleave(n)
    return cache


class HFRollout:
    """Generate with a transformers causal LM.

    `model_or_dir` is a model instance (then the trainer's own policy is used in place and weight updates
    are free), a directory to load one from, or the trainer's `models.PolicyLogprobs` around it. With several
    processes that wrapper is FSDP-sharded and no process holds the whole policy: generation runs inside its
    forward (where the root's parameters are gathered; each block gathers its own as it runs), with
    generate(synced_gpus=True) so every rank runs as many decoding steps as the slowest.
    """

    def __init__(self, model_or_dir, *, device="cpu", seed: int = 0, pad_token_id: int | None = None,
                 eos_token_id: int | None = None, share_prefill: bool = True):
        if isinstance(model_or_dir, (str, bytes)) or hasattr(model_or_dir, "__fspath__"):
            from ..models.loading import load_model

            model_or_dir = load_model(model_or_dir, flag="HFRollout", scalar=False, device=device)
        self.wrapper = model_or_dir if isinstance(model_or_dir, PolicyLogprobs) else None
        self.model = model_or_dir.lm if self.wrapper is not None else model_or_dir
        cfg = self.model.config
        self.pad_id = pad_token_id if pad_token_id is not None else (cfg.pad_token_id or 0)
        self.eos_id = eos_token_id if eos_token_id is not None else cfg.eos_token_id
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.share_prefill = share_prefill  # n > 1: each prompt's KV cache computed once (`shared_prefill`)

    @torch.no_grad()
    def generate(self, prompt_token_ids, *, n=1, max_tokens, temperature=1.0, top_p=1.0, top_k=-1,
                 stop_token_ids=None, seed: int | None = None, seeds: list[int] | None = None) -> list[RolloutResult]:
        """Sample n continuations per prompt (prompt-major). seed: prompt i samples with seed + i; seeds: one
        seed per prompt. A prompt's answers depend only on its seed (`SeededSampler`), so a resumed run, or
        one split across another number of processes, draws the same answers; without a seed, draws continue
        this backend's seeded stream."""
        if not prompt_token_ids:
            return []
        device = next(self.model.parameters()).device
        stops = {self.eos_id, *(stop_token_ids or [])}
        prompts = [p for p in prompt_token_ids for _ in range(n)]  # prompt-major
        p_len = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), p_len), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, p_len - len(p):] = torch.tensor(p)
            attn[i, p_len - len(p):] = 1
        per_prompt = prompt_seeds(len(prompt_token_ids), seed, seeds)
        if per_prompt is None:
            # independent draws (a base + i would overlap the next call's range)
            per_prompt = torch.randint(0, MASK, (len(prompt_token_ids),), generator=self.generator).tolist()
        was_training = self.model.training
        self.model.eval()
        recorder = SampledLogprobs(temperature)
        sampler = SeededSampler(temperature, top_p, top_k, [(s, j) for s in per_prompt for j in range(n)])
        # greedy over the sampler's Gumbel-perturbed scores is a draw from softmax(logits / T), top-k/top-p
        ids, attn = ids.to(device), attn.to(device)
        synced = dist.world().size > 1 and self.wrapper is not None

        def run(model):
            cache = shared_prefill(model, ids, attn, n) if self.share_prefill and n > 1 and p_len > 1 else None
            return model.generate(
                input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=max_tokens, past_key_values=cache,
                eos_token_id=sorted(stops), pad_token_id=self.pad_id, logits_processor=[recorder, sampler],
                synced_gpus=synced)

        sequences = run_inside(self.wrapper, run) if self.wrapper is not None else run(self.model)
        self.model.train(was_training)
        new = sequences[:, p_len:]
        logp = recorder.finish(new[:, -1]).cpu()    # [N, steps]
        new = new.cpu()
        # each answer ends at its first stop token (generate pads the finished ones with pad_token_id)
        is_stop = torch.isin(new, torch.tensor(sorted(stops), dtype=new.dtype))
        first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, torch.full((len(new),), new.shape[1]))
        results = []
        for i, (row, lp, length) in enumerate(zip(new.tolist(), logp, first.tolist())):
            reason = "stop" if is_stop[i].any() else "length"
            results.append(RolloutResult(i // n, row[:length], lp[:length].tolist(), reason))
        return results

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name not in params:
                raise ValueError(f"update_weights: no parameter named {name!r} in the rollout model")
            dst = params[name]
            if dst.data_ptr() != tensor.data_ptr():
                dst.copy_(tensor.to(dst.device, dst.dtype))

    def close(self) -> None:
        self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
