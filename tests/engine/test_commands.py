"""Every config field a command does not read is refused by name when it is set, on the built-in task and on
a user's checkpoint; every field it reads is accepted. The expectations below are written out by hand, as a
specification, not derived from engine/commands.py."""
import dataclasses

import pytest

from engine.cli import build_parser, parse
from engine.commands import SECTIONS
from engine.config import Config

# A valid value other than the default, for every field (values that only make sense together are avoided).
OTHER = {
    "run.out": "elsewhere", "run.device": "cuda", "run.dtype": "float32", "run.attention": "eager",
    "ppo.minibatch": 16, "ppo.rollout_batch": 128, "ppo.kl_estimator": "k3", "ppo.backend": "torch",
    "ppo.tis_cap": 2.0, "ppo.gamma": 0.5, "rollout.backend": "auto", "rollout.top_k": 5, "rollout.top_p": 0.5,
    "policy.lora_targets": "q_proj", "value.lora_targets": "q_proj", "policy.lora_dropout": 0.1,
    "value.lora_dropout": 0.1, "data.long_prompts": "drop", "model.num_heads": 4, "model.hidden_size": 256,
    "task.n_heldout_labelers": 5, "run.resume": True, "reward.fn": "my_rewards:exact",
    "ppo.advantage_estimator": "reinforce_pp", "ppo.loss_agg": "seq-mean-token-mean", "ppo.kl_loss_estimator": "k2",
    "ppo.old_logprobs": "engine", "dpo.backend": "torch", "dpo.loss": "ipo", "ppo.off_policy_correction": "tis",
    "rollout.engine_cores": "split", "reward.ensemble": "wco", "gold.fn": "my_gold:judge", "rollout.env": "my_env:Env",
    "rollout.tools": "my_tools:lookup",
}
# fields whose other value needs a companion to be valid, or to be read at all
WITH = {"ppo.drop_constant_groups": ["--ppo.samples_per_prompt", "2"], "run.offload_frozen": ["--run.device", "cuda"],
        "rollout.tensor_parallel": ["--rollout.backend", "vllm"], "ppo.off_policy_correction": ["--ppo.max_staleness", "1"],
        "rollout.engine_cores": ["--ppo.max_staleness", "1"], "reward.uwo_lambda": ["--reward.ensemble", "uwo"],
        "data.eval_prompts": ["--gold.fn", "my_gold:judge"],
        **{f"rollout.{k}": ["--rollout.env", "my_env:Env"] for k in ("max_turns", "max_episode_tokens", "max_env_tokens",
                                                                    "env_timeout")}}


def other(key: str, default):
    if key in OTHER:
        return OTHER[key]
    if key.endswith(".path") or key.startswith("data.") and default is None:
        return "/some/dir"
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default else 0.01
    raise AssertionError(f"no other value for {key}")


def fields(section):
    return [f"{section}.{f.name}" for f in dataclasses.fields(getattr(Config(), section))]


ALL = {k for s in SECTIONS["pipeline"] for k in fields(s)}
RUN = set(fields("run"))
NO_FROZEN = RUN - {"run.offload_frozen", "run.keep_dropout"}  # a command with no reference or reward model to
# load, and no RL or preference training whose dropout it would turn off
FILES = {f"data.{f}" for f in ("prompts", "demonstrations", "comparisons", "eval_comparisons", "pretrain",
                                "eval_prompts")}
GOLD = set(fields("gold"))  # a user's gold (the built-in task's is its held-out labelers)
LENGTHS = {"data.max_prompt_tokens", "data.max_response_tokens", "data.long_prompts"}
LORA_DETAILS = {"lora_alpha", "lora_dropout", "lora_targets"}
BUILTIN_ONLY = set(fields("task")) | set(fields("eval")) | {"ppo.eval_every", "ppo.eval_prompts"}


def trained(role):  # what a command that trains `role` reads of it (LoRA details only with lora_rank > 0)
    return {f"{role}.{n}" for n in ("path", "lora_rank", "gradient_checkpointing")}


PPO_READS = (set(fields("ppo")) - {"ppo.ptx_coef", "ppo.ptx_batch", "ppo.target_kl", "ppo.kl_horizon",
                                   "ppo.kl_loss_estimator"}) | \
    (set(fields("rollout")) - {"rollout.gpu_memory_utilization", "rollout.sleep", "rollout.cpu_packed_gemm"}) \
    | {"reward.fn", "reward.ensemble", "reward.uwo_lambda"}
READS = {  # command -> (read on the built-in task, read on a user's checkpoint)
    "pretrain": (NO_FROZEN | set(fields("task")) | set(fields("model")) | set(fields("pretrain")),
                 NO_FROZEN | {"policy.path"}),
    "sft": (NO_FROZEN | set(fields("task")) | trained("policy") | LENGTHS | set(fields("sft")),
            NO_FROZEN | trained("policy") | LENGTHS | set(fields("sft")) | {"data.demonstrations"}),
    "rm": (NO_FROZEN | set(fields("task")) | {"policy.path", "reward.path", "value.lora_rank",
                                              "value.gradient_checkpointing"} | LENGTHS | set(fields("rm")),
           NO_FROZEN | {"policy.path", "reward.path", "value.lora_rank", "value.gradient_checkpointing"} | LENGTHS
           | set(fields("rm")) | {"data.comparisons", "data.demonstrations", "data.eval_comparisons"}),
    "ppo": (RUN | set(fields("task")) | set(fields("eval")) | trained("policy") | trained("value") | LENGTHS
            | {"reference.path", "reward.path"} | PPO_READS,
            RUN | trained("policy") | trained("value") | LENGTHS | {"reference.path", "reward.path", "data.prompts"}
            | PPO_READS - {"ppo.eval_every", "ppo.eval_prompts"} | GOLD | {"data.eval_prompts"}),
    "eval": (NO_FROZEN | set(fields("task")) | set(fields("eval")) | {"rollout.max_new_tokens"},
             NO_FROZEN | {"policy.path"}),
    "dpo": (RUN | set(fields("task")) | trained("policy") | LENGTHS | {"reference.path"} | set(fields("dpo")),
            RUN | trained("policy") | LENGTHS | {"reference.path"} | set(fields("dpo"))
            | {"data.comparisons", "data.eval_comparisons"}),
    # the pipeline reads the dpo section only with --with_dpo true (test_conditional_fields_...)
    "pipeline": (ALL - set(fields("dpo")) - FILES - GOLD - {f"{r}.{d}" for r in ("policy", "value") for d in LORA_DETAILS}
                 - {"ppo.target_kl", "ppo.kl_horizon", "rollout.gpu_memory_utilization", "rollout.sleep",
                    "rollout.cpu_packed_gemm", "policy.path", "ppo.kl_loss_estimator"},
                 ALL - set(fields("dpo")) - BUILTIN_ONLY - set(fields("model")) - set(fields("pretrain"))
                 - {f"{r}.{d}" for r in ("policy", "value") for d in LORA_DETAILS}
                 - {"ppo.target_kl", "ppo.kl_horizon", "rollout.gpu_memory_utilization", "rollout.sleep",
                    "rollout.cpu_packed_gemm", "ppo.kl_loss_estimator"}),
}


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("mode", ["builtin", "user"])
@pytest.mark.parametrize("command", list(READS))
def test_every_field_a_command_does_not_read_is_refused_by_name(parser, command, mode):
    reads = READS[command][mode == "user"]
    base = [command, "--out", "/tmp/unused"] + (["--policy.path", "/some/policy"] if mode == "user" else [])
    wrong = []
    for key in sorted(k for s in SECTIONS[command] for k in fields(s)):
        if key in ("policy.path", "run.out"):  # the mode switch; --out is given above
            continue
        section, name = key.split(".")
        value = other(key, getattr(getattr(Config(), section), name))
        companions = WITH.get(key, [])  # given only where the command has their section (eval has no ppo)
        if any(flag[2:].split(".")[0] not in SECTIONS[command] for flag in companions[::2]):
            companions = []
        argv = base + [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)] + companions
        try:
            parse(argv, parser)
            refused = None
        except ValueError as exc:
            refused = str(exc)
        if key in reads and refused is not None:
            wrong.append(f"{key} is read by {command} ({mode}) but was refused: {refused}")
        if key not in reads and (refused is None or f"--{key} (" not in refused):
            wrong.append(f"{key} is not read by {command} ({mode}) but was {'accepted' if refused is None else refused}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("command,flag", [("sft", "--ppo.kl_coef"), ("rm", "--rollout.top_p"), ("eval", "--sft.lr"),
                                          ("pretrain", "--data.prompts")])
def test_a_section_a_command_does_not_have_is_an_unknown_argument(parser, command, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse([command, flag, "1"], parser)
    assert exc.value.code == 2 and flag.split(".")[0] in capsys.readouterr().err


def test_conditional_fields_are_read_once_their_switch_is_on(parser):
    """ptx_coef with --ptx true, target_kl with the adaptive controller, LoRA details with a rank, the KL loss's
    estimator with its coefficient; a critic-free estimator refuses the value model's fields."""
    parse(["ppo", "--ptx", "true", "--ppo.ptx_coef", "0.5", "--ppo.adaptive_kl", "true", "--ppo.target_kl", "3",
           "--policy.lora_rank", "4", "--policy.lora_alpha", "8", "--ppo.kl_loss_coef", "0.1",
           "--ppo.kl_loss_estimator", "k2"], parser)
    with pytest.raises(ValueError, match=r"--value.path \(--ppo.advantage_estimator grpo trains no value model\)"):
        parse(["ppo", "--ppo.advantage_estimator", "grpo", "--ppo.samples_per_prompt", "4", "--value.path", "/v"],
              parser)
    with pytest.raises(ValueError, match=r"--ppo.ptx_coef \(only PPO-ptx reads it: add --ptx true\)"):
        parse(["ppo", "--ppo.ptx_coef", "0.5"], parser)
    parse(["pipeline", "--with_dpo", "true", "--dpo.loss", "listwise", "--dpo.length_norm", "true"], parser)
    parse(["dpo", "--dpo.reference_free", "true", "--dpo.length_norm", "true"], parser)
