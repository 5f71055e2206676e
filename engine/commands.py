"""What each command reads. A command offers only the config sections it uses (so a flag of another section
is an unknown argument); within them, a field it does not read in this run is refused by name when it is
set, never ignored (`unread`)."""
from __future__ import annotations

import dataclasses

from .config import Config
from .trainers.passes import needs_reference

COMMANDS = {
    "pretrain": "pretrain the tiny LM on the built-in corpus",
    "sft": "supervised fine-tuning on the demonstrations",
    "rm": "train the reward model on K-way rankings (all K-choose-2 pairs per prompt)",
    "ppo": "PPO against the reward model (--ptx true for PPO-ptx)",
    "dpo": "DPO from the SFT policy on the comparisons, no reward model (--dpo.loss sigmoid|ipo|listwise)",
    "eval": "held-out labelers' win rates, RM accuracy, alignment tax -> report.md / report.json",
    "pipeline": "all of the above in order: (pretrain,) sft, rm, ppo, ppo-ptx (, dpo with --with_dpo true) (, eval)",
    "reproduce": "Figure 1 in miniature: SFT, PPO, PPO-ptx at several model sizes (a benchmark, minutes each)",
    "export": "write a run's final policy as a plain transformers directory (loads in transformers and vLLM)",
    "label": "the labeling web app: people rank a policy's answers or judge two policies blind (`label rank`, "
             "`label compare`, `label serve`, `label report`)",
    "plan": "memory per GPU (or CPU process) of an sft/rm/dpo/ppo/grpo job at any size, by simulation on this "
            "machine, and the smallest setting that fits (`--policy CONFIG.json --nodes N --gpus-per-node G`)",
    "tiny-model": "write a small random checkpoint of a real family (llama, qwen2, mistral, gpt2) with its "
                  "tokenizer, to try --policy.path without downloads",
}
ALL = tuple(f.name for f in dataclasses.fields(Config))
SECTIONS = {
    "pretrain": ("run", "task", "model", "pretrain", "policy"),
    "sft": ("run", "task", "policy", "data", "sft"),
    "rm": ("run", "task", "policy", "reward", "value", "data", "rm"),
    "ppo": ("run", "task", "policy", "reference", "reward", "value", "data", "ppo", "rollout", "eval", "gold"),
    "dpo": ("run", "task", "policy", "reference", "data", "dpo"),
    "eval": ("run", "task", "rollout", "eval", "policy"),
    "pipeline": ALL,
    "reproduce": ALL,
    "export": (),
    "label": (),
    "plan": (),
    "tiny-model": (),
}
DATA_FILES = ("prompts", "demonstrations", "comparisons", "eval_comparisons", "pretrain", "eval_prompts")
# the data files each training command reads (the pipeline reads them all)
READS_FILES = {"sft": ("demonstrations",), "rm": ("comparisons", "demonstrations", "eval_comparisons"),
               "ppo": ("prompts", "pretrain", "eval_prompts"), "dpo": ("comparisons", "eval_comparisons")}
LORA_DETAILS = ("lora_alpha", "lora_dropout", "lora_targets")


def _changed(section, *names: str) -> list[str]:
    defaults = type(section)()
    return [n for n in names if getattr(section, n) != getattr(defaults, n)]


def unread(command: str, cfg: Config, ptx: bool = False, dpo: bool = False) -> list[str]:
    """'section.field: why' for every field set away from its default that `command` does not read (dpo: the
    pipeline runs the DPO stage)."""
    out = []

    def refuse(section: str, names, why: str):
        out.extend(f"--{section}.{n} ({why})" for n in _changed(getattr(cfg, section), *names))

    fields = {s: [f.name for f in dataclasses.fields(getattr(cfg, s))] for s in ALL}
    offered = SECTIONS[command]
    if cfg.local:  # the user's checkpoint and data
        for section in ("task", "model", "pretrain"):
            if section in offered:
                refuse(section, fields[section], "the built-in task's; your run brings its own model and data")
        if "eval" in offered and not cfg.gold.given:
            refuse("eval", fields["eval"], "the held-out labelers' win rate is the built-in task's")
        if command == "eval":
            refuse("rollout", ("max_new_tokens",), "the held-out labelers' win rate is the built-in task's")
        if "ppo" in offered and not cfg.gold.given:
            refuse("ppo", ("eval_every", "eval_prompts"), "the held-out labelers' win rate is the built-in task's; "
                                                          "on your model, give a gold: --gold.path or --gold.fn")
        if "gold" in offered and not cfg.gold.given:
            refuse("data", ("eval_prompts",), "the gold judges answers to them: give --gold.path or --gold.fn")
        if command == "reproduce":
            out.append("--policy.path (reproduce runs the built-in task at several sizes)")
    else:
        if "gold" in offered:
            refuse("gold", fields["gold"], "the built-in task's gold is its held-out labelers")
        if "data" in offered:
            refuse("data", DATA_FILES, "the built-in task makes its own data: give --policy.path DIR to train your "
                                       "own checkpoint on your files")
    if command in READS_FILES and cfg.local:
        refuse("data", [f for f in DATA_FILES if f not in READS_FILES[command]], f"`{command}` does not read it")
    if command in ("pretrain", "sft", "rm", "eval"):
        refuse("run", ("offload_frozen",), f"`{command}` loads no frozen reference or reward model")
        refuse("run", ("keep_dropout",), f"`{command}` trains with the checkpoint's dropout; only ppo and dpo turn "
                                         f"it off")
    if command in ("pretrain", "eval"):  # the policy section is offered for --policy.path's explanation only
        refuse("policy", [n for n in fields["policy"] if n != "path"], f"`{command}` trains no policy of yours")
    if command == "rm":
        refuse("policy", ("lora_rank", "gradient_checkpointing", *LORA_DETAILS),
               "the reward model is trained with the --value.* settings")
        refuse("value", ("path",), "`rm` starts from --reward.path or the policy")
        refuse("reward", ("fn",), "`rm` trains a reward model; a reward function is PPO's")
        refuse("reward", ("ensemble", "uwo_lambda"), "how PPO combines an ensemble's members; `rm` trains them "
                                                     "(--rm.members)")
    if "ppo" in offered:
        if cfg.reward.ensemble != "uwo":
            refuse("reward", ("uwo_lambda",), "only --reward.ensemble uwo reads it")
        estimator = cfg.ppo.advantage_estimator
        if estimator != "gae":  # critic-free: no value model, no GAE
            why = f"--ppo.advantage_estimator {estimator} trains no value model"
            refuse("value", fields["value"], why)
            refuse("ppo", ("value_lr", "vf_coef", "value_clip_eps", "lam", "whiten_advantages"), why)
            if estimator != "reinforce_pp":
                refuse("ppo", ("gamma",), f"{estimator} compares whole answers; gamma discounts along one")
        if cfg.ppo.kl_loss_coef == 0:
            refuse("ppo", ("kl_loss_estimator",), "the KL term in the loss is off: set --ppo.kl_loss_coef")
        if not needs_reference(cfg.ppo):
            refuse("reference", ("path",),
                   "nothing reads the reference (--ppo.kl_coef 0, --ppo.kl_loss_coef 0): set --ppo.log_kl true to "
                   "log the KL to it")
    if command == "ppo" and not ptx:
        refuse("ppo", ("ptx_coef", "ptx_batch"), "only PPO-ptx reads it: add --ptx true")
        refuse("data", ("pretrain",), "only PPO-ptx reads it: add --ptx true")
    if command in ("pipeline", "reproduce") and not dpo:
        refuse("dpo", fields["dpo"], "the DPO stage is off: add --with_dpo true" if command == "pipeline" else
               "reproduce trains SFT, PPO and PPO-ptx")
    if command == "dpo" and cfg.dpo.reference_free:
        refuse("reference", ("path",), "--dpo.reference_free true uses no reference model")
    if command == "eval":
        refuse("rollout", [n for n in fields["rollout"] if n != "max_new_tokens"],
               "eval samples with transformers at --eval.temperature")
    if "ppo" in offered and cfg.ppo.max_staleness == 0:
        refuse("ppo", ("off_policy_correction",), "the synchronous loop corrects with --ppo.tis_cap alone: add "
               "--ppo.max_staleness k")
        refuse("rollout", ("engine_cores",), "the synchronous loop runs the engine in its own process only with "
               "--ppo.max_staleness k")
    if "ppo" in offered and not (cfg.rollout.env or cfg.rollout.tools):
        refuse("rollout", ("max_turns", "max_episode_tokens", "max_env_tokens", "env_timeout"),
               "only episodes read it: add --rollout.env package.module:Class or --rollout.tools "
               "package.module:fn")
    if "ppo" in offered and not cfg.ppo.adaptive_kl:
        refuse("ppo", ("target_kl", "kl_horizon"), "only the adaptive KL controller reads it: add --ppo.adaptive_kl true")
    critic_free = "ppo" in offered and cfg.ppo.advantage_estimator != "gae"
    for role in ("policy", "value"):
        refused_whole = (role == "policy" and command in ("rm", "pretrain", "eval")) or (role == "value" and
                                                                                       critic_free)
        if role in offered and getattr(cfg, role).lora_rank == 0 and not refused_whole:
            refuse(role, LORA_DETAILS, f"LoRA is off: set --{role}.lora_rank")
    if "rollout" in offered and command != "eval" and (cfg.run.device != "cuda" or cfg.rollout.backend == "hf"):
        refuse("rollout", ("gpu_memory_utilization", "sleep"), "for vLLM colocated on a GPU only")
    if "rollout" in offered and command != "eval" and (cfg.run.device == "cuda" or cfg.rollout.backend == "hf"):
        refuse("rollout", ("cpu_packed_gemm",), "for vLLM on the CPU only")
    return out
