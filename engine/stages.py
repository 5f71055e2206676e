"""The stages, once each, for the built-in task and a user's checkpoint and data alike.

    sft  --policy.path BASE --data.demonstrations F                 -> OUT/sft/final/policy
    rm   --policy.path SFT  --data.comparisons F [--data.demonstrations F] [--reward.path INIT]
                                                                    -> OUT/rm/final/reward
    ppo  --policy.path SFT  --reward.path RM --data.prompts F [--ptx true --data.pretrain F]
                                                                    -> OUT/ppo[_ptx]/final/policy
    dpo  --policy.path SFT  --data.comparisons F [--dpo.loss ipo|listwise]
                                                                    -> OUT/dpo[_ipo|_listwise]/final/policy
    pipeline: sft -> rm -> ppo (-> ppo-ptx) (-> dpo with --with_dpo true), each starting from the one before.

On the built-in task (no --policy.path) the task gives the data files, `pretrain` builds and trains the
tiny model, each stage starts from the run's previous one, PPO also reports the held-out labelers' win
rate against SFT, and `eval` writes the report. The reference model is the policy's starting weights
(`--reference.path` to choose another); the value model starts from the reward model (`--value.path`).
Under LoRA (`--policy.lora_rank`) the reference is the policy with its adapters disabled.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import torch

from kernels import needs_critic

from .config import TrainedModelConfig
from .data.encode import make_encoder, special_texts, text_examples
from .data.formats import load
from .episodes import episode_task, episode_tokens
from .episodes.tools import load_tools, schema as tool_schema, shown as shown_tools
from .models.batch import make_batch
from .models.dropout import disable_dropout
from .models.forward import PolicyLogprobs, SequenceScores
from .models.loading import load_model, load_tokenizer, resolve_dtype, same_vocabulary
from .gold import gold_evaluator, gold_scorer
from .models.sharding import shard
from .overopt import ensemble
from .parallel import distributed as dist
from .reward_fn import call_reward_fn, load_reward_fn, prompt_text
from .trainers.dpo import train_dpo
from .trainers.lm import train_lm
from .trainers.passes import needs_reference
from .trainers.ppo import train_ppo
from .trainers.ppo_setup import PPOSetup
from .trainers.reward import pairwise_accuracy, train_reward

log = logging.getLogger("engine")


def _need(value, flag: str, stage: str, what: str):
    if value is None:
        raise ValueError(f"{stage} with --policy.path needs {flag}: {what}")
    return value


def _from_run(ctx, **roles):
    """On the built-in task, checkpoints a user would name come from the run's earlier stages: role=(stage,
    model) for each role not given on the command line."""
    if ctx.task is None:
        return ctx
    paths = {role: ctx.final(*where) for role, where in roles.items() if getattr(ctx.cfg, role).path is None}
    return ctx.using(**paths) if paths else ctx


def _loader(ctx, path, flag, *, scalar, train, tokenizer, no_dropout: bool = False, heads: int | None = None,
            mean_head: bool = False):
    """load(resume) of a trained role. no_dropout: an RL or preference stage's model, its dropout turned off
    unless --run.keep_dropout true. heads: a scalar model's score heads (loading.score_heads)."""
    cfg = ctx.cfg

    def load(resume):
        model = load_model(path, flag=flag, scalar=scalar, device=ctx.device, run=cfg.run, train=train,
                           resume=resume, tokenizer=tokenizer, heads=heads, mean_head=mean_head)
        if no_dropout and not cfg.run.keep_dropout:
            disable_dropout(model)
        return model
    return load


def _context_length(path) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(str(path)), "max_position_embeddings", 1 << 20))


def _encoder(tokenizer, cfg, path, flag, reserve: int = 1):
    """The encoder of texts for the model at `path`: the length rule bounded by its positions."""
    return make_encoder(tokenizer, cfg.data, _context_length(path), reserve, flag)


def _load(path, kind: str, enc) -> list:
    return load(path, kind, special_texts(enc.tokenizer))


def _same_tokenizer(tokenizer, path, flag: str, why: str):
    other = load_tokenizer(path, flag)
    if not same_vocabulary(tokenizer, other):
        raise ValueError(f"{flag} {path}: its tokenizer differs from the policy's (--policy.path "
                         f"{Path(tokenizer.name_or_path)}); {why}")


def _encode_demonstrations(enc, path) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of a demonstrations file; prompts the length rule drops are left out."""
    out = []
    for d in _load(path, "demonstrations", enc):
        p = enc.prompt(d.prompt)
        if p is not None:
            out.append((p, enc.response(d.prompt, d.completion, len(p))))
    return out


def encode_comparisons(enc, path) -> list[dict]:
    """{prompt, responses, ranks} token-id rows (ranks: 0 = best) of a comparisons file. A response marked
    unfinished (cut off while being sampled) has no end-of-turn token."""
    rows = []
    for c in _load(path, "comparisons", enc):
        p = enc.prompt(c.prompt)
        if p is None:
            continue
        ranks = [0] * len(c.ranking)
        for place, i in enumerate(c.ranking):  # ranking: indices best first -> rank of each response
            ranks[i] = place
        finished = c.finished or [True] * len(c.responses)
        rows.append({"prompt": p, "ranks": ranks,
                     "responses": [enc.response(c.prompt, r, len(p), finished=f) for r, f in zip(c.responses, finished)]})
    return rows


def sft(ctx) -> Path:
    ctx = _from_run(ctx, policy=("pretrain", "policy"))
    cfg = ctx.cfg
    path = _need(cfg.data.demonstrations, "--data.demonstrations FILE", "sft", "the demonstrations to imitate")
    enc = _encoder(ctx.tokenizer, cfg, cfg.policy.path, "--policy.path")
    examples = _encode_demonstrations(enc, path)
    log.info("sft: %s: %s", path, enc.counts.summary())
    load_fn = _loader(ctx, cfg.policy.path, "--policy.path", scalar=False, train=cfg.policy, tokenizer=ctx.tokenizer)
    return train_lm(ctx, "sft", examples, load_fn, cfg.sft)


def rm(ctx) -> Path:
    """The RM starts from --reward.path when given (with its own tokenizer), else from the SFT policy."""
    ctx = _from_run(ctx, policy=("sft", "policy"))
    cfg = ctx.cfg
    path = _need(cfg.data.comparisons, "--data.comparisons FILE", "rm", "labelers' comparisons to learn from")
    init, flag = (cfg.reward.path, "--reward.path") if cfg.reward.path else (cfg.policy.path, "--policy.path")
    tok = load_tokenizer(init, flag) if cfg.reward.path else ctx.tokenizer
    ctx = dataclasses.replace(ctx, tokenizer=tok)
    enc = _encoder(tok, cfg, init, flag)
    rows = encode_comparisons(enc, path)
    log.info("rm: %s: %s", path, enc.counts.summary())
    demos = None
    if cfg.data.demonstrations:
        pairs = _encode_demonstrations(enc, cfg.data.demonstrations)
        demos = ([p for p, _ in pairs], [r for _, r in pairs])
    evaluate = None
    if cfg.data.eval_comparisons:
        heldout = encode_comparisons(_encoder(tok, cfg, init, flag), cfg.data.eval_comparisons)

        def evaluate(model) -> dict:
            return {"rm_heldout_accuracy": pairwise_accuracy(model, heldout, tok.pad_token_id)}
    # The `value` section's LoRA and checkpointing settings apply to every scalar-head model being trained.
    return train_reward(ctx, _loader(ctx, init, flag, scalar=True, train=cfg.value, tokenizer=tok,
                                     heads=cfg.rm.members), cfg.rm, rows, demos, evaluate)


def _reference(ctx, needed: bool, why: str):
    """The frozen reference of PPO and DPO: --reference.path (its tokenizer must be the policy's: `why`), else
    the policy's starting weights loaded again. None when nothing reads it (`needed` false), or under LoRA
    without --reference.path: the policy with its adapters disabled, the base weights once in memory."""
    cfg = ctx.cfg
    if not needed or (cfg.policy.lora_rank > 0 and not cfg.reference.path):
        return None
    if cfg.reference.path:
        _same_tokenizer(ctx.tokenizer, cfg.reference.path, "--reference.path", why)
        path, flag = cfg.reference.path, "--reference.path"
    else:
        path, flag = cfg.policy.path, "--policy.path"
    return load_model(path, flag=flag, scalar=False, device=ctx.device, run=cfg.run, tokenizer=ctx.tokenizer)


def dpo(ctx) -> Path:
    """DPO, IPO or listwise DPO (--dpo.loss) from the SFT policy on the comparisons, no reward model. The
    reference is --reference.path, else the policy's starting weights (under LoRA: the policy with its
    adapters disabled); none with --dpo.reference_free true."""
    ctx = _from_run(ctx, policy=("sft", "policy"))
    cfg, tok = ctx.cfg, ctx.tokenizer
    path = _need(cfg.data.comparisons, "--data.comparisons FILE", "dpo", "labelers' comparisons to learn from")
    enc = _encoder(tok, cfg, cfg.policy.path, "--policy.path")
    rows = encode_comparisons(enc, path)
    log.info("dpo: %s: %s", path, enc.counts.summary())
    rows = _distinct_answers(rows, path)
    heldout = encode_comparisons(enc, cfg.data.eval_comparisons) if cfg.data.eval_comparisons else None
    reference = _reference(ctx, not cfg.dpo.reference_free,
                           "DPO compares the two models' log-probs of the same tokens")
    load_fn = _loader(ctx, cfg.policy.path, "--policy.path", scalar=False, train=cfg.policy, tokenizer=tok,
                      no_dropout=True)
    return train_dpo(ctx, load_fn, reference, cfg.dpo, rows, heldout)


def _distinct_answers(rows: list[dict], path) -> list[dict]:
    """The comparisons whose answers all differ: one that ranks the same answer (token for token) above itself
    teaches DPO nothing (its margin is 0 whatever the policy) and says the data is not what it claims."""
    kept = [r for r in rows if len({tuple(x) for x in r["responses"]}) == len(r["responses"])]
    if len(kept) < len(rows):
        log.warning("dpo: %s: %d of %d comparisons rank the same answer twice (identical tokens); left out",
                    path, len(rows) - len(kept), len(rows))
    if not kept:
        raise ValueError(f"dpo: {path}: every comparison ranks the same answer against itself (chosen and rejected "
                         f"identical); nothing to learn a preference from. Check how the file was made")
    return kept


def _reward_model(ctx):
    """(the reward model, its tokenizer) of --reward.path, or None."""
    cfg = ctx.cfg
    if not cfg.reward.path:
        return None
    rm_tok = load_tokenizer(cfg.reward.path, "--reward.path")
    rm = load_model(cfg.reward.path, flag="--reward.path", scalar=True, device=ctx.device, run=cfg.run,
                    tokenizer=rm_tok, head_required=True)
    combine = functools.partial(ensemble.combine, mode=cfg.reward.ensemble, uwo_lambda=cfg.reward.uwo_lambda)
    return shard(SequenceScores(rm, combine), offload=cfg.run.offload_frozen), rm_tok


def _scorer(ctx, reward_model, prompts, enc, spreads: list):
    """score(batch, prompt index of each row, results) -> rewards [B]: the reward model's (--reward.path) plus
    the reward function's (--reward.fn), whichever are given. spreads: where an ensemble's spreads go."""
    cfg, parts = ctx.cfg, []
    if reward_model is not None:
        parts.append(_reward_scorer(ctx, *reward_model, cfg.reward.path, prompts, enc, spreads))
    if cfg.reward.fn:
        fn, spec = load_reward_fn(cfg.reward.fn), cfg.reward.fn

        def by_function(batch, idx, results):
            texts = [prompt_text(prompts[i]) for i in idx]
            answers = [enc.text_of(r.token_ids) if r.episode is None else  # an episode: every turn's text
                       enc.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in results]
            return call_reward_fn(fn, spec, texts, answers).to(ctx.device)
        parts.append(by_function)
    if not parts:  # an environment's rewards alone (--rollout.env)
        return lambda batch, idx, results: batch.input_ids.new_zeros(len(idx), dtype=torch.float32)
    if len(parts) == 1:
        return parts[0]
    return lambda batch, idx, results: sum(part(batch, idx, results) for part in parts)


def _reward_scorer(ctx, reward, rm_tok, rm_path, prompts, enc, spreads: list | None = None):
    """score(batch, prompt indices, results): RM scores, re-tokenizing text when the RM has its own tokenizer.
    An ensemble's members are combined (--reward.ensemble) and their spread per answer appended to `spreads`."""
    def scores(batch):
        if reward.heads == 1:
            return reward(batch)
        members = reward(batch, members=True)
        if spreads is not None:
            spreads.extend(ensemble.spread(members).tolist())
        return reward.combine(members)
    if same_vocabulary(ctx.tokenizer, rm_tok):
        return lambda batch, idx, results: scores(batch)
    log.warning("ppo: the reward model's tokenizer differs from the policy's: each answer is decoded to text "
                "and re-tokenized for the reward model")
    rm_enc = make_encoder(rm_tok, dataclasses.replace(ctx.cfg.data, long_prompts="truncate"),
                          _context_length(rm_path), 1, "--reward.path")

    def score(batch, idx, results):
        rm_prompts, rm_responses = [], []
        for i, r in zip(idx, results):
            rm_prompts.append(rm_enc.prompt(prompts[i]))
            rm_responses.append(rm_enc.response(prompts[i], enc.text_of(r.token_ids), len(rm_prompts[-1]),
                                                finished=r.finish_reason == "stop"))
        return scores(make_batch(rm_prompts, rm_responses, rm_tok.pad_token_id).to(ctx.device))
    return score


def _value_start(cfg) -> tuple[str, str] | None:
    """(path, flag) the value model starts from: --value.path, else the RM (InstructGPT), else the policy (a
    reward function alone); None for a critic-free estimator."""
    if not needs_critic(cfg.ppo.advantage_estimator):
        return None
    if cfg.value.path:
        return cfg.value.path, "--value.path"
    return (cfg.reward.path, "--reward.path") if cfg.reward.path else (cfg.policy.path, "--policy.path")


def ppo(ctx, ptx: bool = False) -> Path:
    """PPO, or a critic-free estimator (--ppo.advantage_estimator), scored by the RM and/or --reward.fn."""
    runs = {"policy": ("sft", "policy")}
    if ctx.cfg.reward.fn is None and not ctx.cfg.rollout.env:  # a reward function or an environment alone needs
        runs["reward"] = ("rm", "reward")                        # no RM; --reward.path adds one to them
    ctx = _from_run(ctx, **runs)
    cfg = ctx.cfg
    path = _need(cfg.data.prompts, "--data.prompts FILE", "ppo", "the prompts to sample answers for")
    if cfg.reward.path is None and cfg.reward.fn is None and not cfg.rollout.env:  # (tools alone reward nothing)
        raise ValueError("ppo with --policy.path needs --reward.path DIR (the reward model: `python -m engine rm` "
                         "writes OUT/rm/final/reward), --reward.fn package.module:function or --rollout.env "
                         "package.module:Class (an environment's rewards), or several")
    tok, dev = ctx.tokenizer, ctx.device
    reward_model = _reward_model(ctx)
    value = _value_start(cfg)
    if value is not None:
        _same_tokenizer(tok, value[0], value[1],
                        "the value model scores every policy token, so it needs the policy's tokenizer"
                        + ("" if cfg.value.path else " (it starts from the reward model unless --value.path is "
                           "given: give --value.path, e.g. the SFT policy)"))
    # nothing reads it without a KL penalty, KL loss or KL metric: never loaded then
    reference = _reference(ctx, needs_reference(cfg.ppo), "the KL penalty compares the two models token by token")
    context = _context_length(cfg.policy.path)
    after = episode_tokens(cfg.rollout)  # an answer's tokens, or an episode's
    enc = make_encoder(tok, cfg.data, context, after, "--policy.path")
    schemas = {fn.__name__: tool_schema(fn) for fn in load_tools(cfg.rollout.tools)} if cfg.rollout.tools else None
    records, prompts, env_args, tools = [], [], [], []
    for i, rec in enumerate(_load(path, "prompts", enc)):
        enc.tools = shown_tools(schemas, rec.tools, f"--data.prompts {path}: record {i + 1}")  # in the prompt
        ids = enc.prompt(rec.prompt)
        if ids is not None:
            records.append(rec.prompt)
            prompts.append(ids)
            env_args.append(rec.env)
            tools.append(rec.tools)
    enc.tools = shown_tools(schemas, None, "")  # every tool, for any other prompt encoded below
    log.info("ppo: %s: %s", path, enc.counts.summary())
    ptx_examples = None
    if ptx:
        texts = _need(cfg.data.pretrain, "--data.pretrain FILE", "ppo --ptx true",
                      "pretraining text ({\"text\": ...} records)")
        ptx_examples = text_examples(tok, load(texts, "texts", special_texts(tok)),
                                     min(cfg.data.max_response_tokens, context - 1))
    def frozen(model):  # as the trainer calls it, sharded (with several processes, read sharded)
        return shard(PolicyLogprobs(model, backend=cfg.ppo.backend, fused=cfg.run.fused_lm_head),
                          offload=cfg.run.offload_frozen)
    reference = frozen(reference) if reference is not None else None
    evaluate = None
    if (ctx.task is not None or cfg.gold.given) and cfg.ppo.eval_every:
        sft_policy = reference if reference is not None else frozen(load_model(
            cfg.policy.path, flag="--policy.path", scalar=False, device=dev, run=cfg.run, tokenizer=tok))
    if ctx.task is None and cfg.gold.given and cfg.ppo.eval_every:  # your model, judged by your gold
        held = _need(cfg.data.eval_prompts, "--data.eval_prompts FILE", "--gold.*",
                     "held-out prompts for the gold to judge answers to")
        held_records = [r.prompt for r in _load(held, "prompts", enc) if enc.prompt(r.prompt) is not None]
        held_records = held_records[:cfg.ppo.eval_prompts]
        if not held_records:
            raise ValueError(f"--data.eval_prompts {held}: no prompt left after the length rule")
        evaluate = gold_evaluator(ctx, sft_policy, [enc.prompt(r) for r in held_records],
                                  gold_scorer(ctx, held_records, enc, _reward_scorer),
                                  _scorer(ctx, reward_model, held_records, enc, None))
    elif ctx.task is not None and cfg.ppo.eval_every:
        proxy = None  # the training RM's score of the evaluation's answers (the built-in RM shares the vocabulary)
        if reward_model is not None and same_vocabulary(tok, reward_model[1]):
            proxy = reward_model[0]
        evaluate = ctx.task.ppo_evaluator(ctx, sft_policy, proxy)
    spreads = []  # an ensemble's members' disagreement per answer, since the last iteration's metrics
    setup = PPOSetup(
        load_policy=_loader(ctx, cfg.policy.path, "--policy.path", scalar=False, train=cfg.policy, tokenizer=tok,
                            no_dropout=True),
        load_value=_loader(ctx, *value, scalar=True, train=cfg.value, tokenizer=tok, no_dropout=True,
                           mean_head=True) if value else None,
        reference=reference,
        score=_scorer(ctx, reward_model, records, enc, spreads),
        reward_spread=spreads,
        policy_dir=Path(cfg.policy.path),
        prompts=prompts,
        ptx_examples=ptx_examples,
        evaluate=evaluate,
        engine_dtype=str(resolve_dtype(cfg.run.dtype, dev)).split(".")[-1],
        max_model_len=min(cfg.data.max_prompt_tokens + after, context),
        episodes=episode_task(cfg.rollout, tok, records, env_args, tools) if cfg.rollout.env or cfg.rollout.tools
        else None,
    )
    return train_ppo(ctx, setup, ptx=ptx)


def pretrain(ctx) -> Path:
    """The built-in task's tiny Llama, built from --model.* and trained on its corpus."""
    if ctx.task is None:
        raise ValueError("pretrain builds the built-in tiny model; with --policy.path start from your checkpoint "
                         "with `sft`")
    cfg, tok = ctx.cfg, ctx.tokenizer
    examples = text_examples(tok, load(cfg.data.pretrain, "texts"), cfg.model.max_positions - 1)

    def load_fn(resume):
        if resume is None:
            return ctx.task.build_policy(cfg.model, tok)
        return load_model(resume, flag="the pretrain checkpoint", scalar=False, device=ctx.device, run=cfg.run,
                          train=TrainedModelConfig(), tokenizer=tok)
    return train_lm(ctx, "pretrain", examples, load_fn, cfg.pretrain)


def evaluate(ctx) -> dict:
    if ctx.task is None:
        raise ValueError("eval judges with the built-in task's held-out labelers, which your data does not have; "
                         "export the policy (`python -m engine export`) and judge its answers with your own "
                         "labelers")
    report = {}
    with dist.main_first():  # the report samples from whole models, with no collective: the main rank writes it
        if dist.world().main:
            report = ctx.task.report(ctx)
            log.info("report: %s", json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}))
    return report


def pipeline(ctx, with_dpo: bool = False) -> dict:
    """(pretrain ->) sft -> rm -> ppo (-> ppo-ptx when there is pretraining text) (-> dpo from the SFT
    policy, with_dpo) (-> eval): each from the one before. With --run.resume, finished stages are skipped."""
    out = {}
    if ctx.task is not None:
        out["pretrain"] = str(pretrain(ctx))
        ctx = ctx.using(policy=out["pretrain"])
    sft_dir = sft(ctx)
    rm_dir = rm(ctx.using(policy=sft_dir))
    ctx = ctx.using(policy=sft_dir, reward=rm_dir)
    out.update(sft=str(sft_dir), rm=str(rm_dir), ppo=str(ppo(ctx)))
    if ctx.cfg.data.pretrain:
        out["ppo_ptx"] = str(ppo(ctx, ptx=True))
    if with_dpo:
        out[ctx.cfg.dpo.stage] = str(dpo(ctx))
    if ctx.task is not None:
        evaluate(ctx)
        if dist.world().main:  # the last line a newcomer reads says where to look next
            print(f"done: the report is {ctx.out / 'report.md'} (report.json and the plots beside it)", flush=True)
    return out
