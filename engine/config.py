"""Typed configuration: one dataclass per role, two levels deep, validated on construction.

The command line (`--ppo.kl_coef 0.05`) and YAML presets (`--config preset.yaml`, keys mapping one to one
onto these sections) are parsed by jsonargparse, which rejects unknown keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _positive(cfg, section: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _require(value >= 1, f"{section}.{name} must be >= 1, got {value}")


@dataclass
class RunConfig:
    out: str = "runs/instructgpt"      # every artefact of the run goes here
    seed: int = 0
    device: str = "cpu"                # "cpu" or "cuda"
    threads: int = 2                   # torch CPU threads
    resume: bool = False               # continue from the checkpoints under `out`
    overwrite: bool = False            # start a stage over, deleting what `out` holds of it
    progress: bool = True              # tqdm progress bars
    fused_lm_head: bool = True         # log-probs from hidden states (kernels.linear_token_logprobs); false =
                                       # LM head then kernels.token_logprobs, kept for comparison
    dtype: str = "auto"                # weights of loaded checkpoints: auto = bfloat16 on cuda, float32 on cpu
    attention: str = "auto"            # auto = flash_attention_2 on cuda when flash-attn is installed, else sdpa;
                                       # on the CPU sdpa_gqa (engine/models/attention.py: no KV-head copies under a mask)
    dist_timeout: float = 600.0        # under torchrun: seconds a process waits for the others in a collective
                                       # before the job stops (a rank that died cannot hang the rest)
    offload_frozen: bool = False       # on GPUs under torchrun: the reference's and reward model's shards in
                                       # CPU memory (FSDP2's CPUOffloadPolicy), copied over for each pass

    keep_dropout: bool = False         # ppo and dpo: train with the checkpoint's dropout (default off, as TRL's DPO
                                       # and OpenRLHF: reused old log-probs assume a forward without noise)

    def __post_init__(self):
        _require(self.device in ("cpu", "cuda"), f"run.device must be 'cpu' or 'cuda', got {self.device!r}")
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"run.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _require(self.attention in ("auto", "sdpa", "eager", "flash_attention_2"),
                 f"run.attention must be auto, sdpa, eager or flash_attention_2, got {self.attention!r}")
        _require(self.threads >= 1, f"run.threads must be >= 1, got {self.threads}")
        _require(self.dist_timeout > 0, f"run.dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        _require(not self.offload_frozen or self.device == "cuda", "run.offload_frozen moves the frozen models' "
                 "shards from the GPU to CPU memory; with --run.device cpu they are there already")
        _require(not (self.resume and self.overwrite), "run.resume and run.overwrite exclude each other: resume "
                 "continues a stage, overwrite deletes it and starts over")


@dataclass
class TaskConfig:
    """The built-in task's data, all made by code from `seed`."""
    seed: int = 0
    n_corpus: int = 20000
    n_corpus_heldout: int = 1000
    n_demonstrations: int = 4000
    n_comparisons: int = 3000           # prompts with K ranked samples each
    n_comparisons_heldout: int = 500
    k_min: int = 4
    k_max: int = 9
    n_ppo_prompts: int = 4000
    n_eval_prompts: int = 600
    n_labelers: int = 8
    n_heldout_labelers: int = 4
    label_noise: float = 1.1            # ~73% inter-labeler agreement, InstructGPT's rate
    labeler_spread: float = 0.2         # how much each labeler's weights differ from the shared ones

    def __post_init__(self):
        _require(2 <= self.k_min <= self.k_max, f"task.k_min/k_max must satisfy 2 <= k_min <= k_max, got "
                 f"{self.k_min}, {self.k_max}")
        _positive(self, "task", "n_corpus", "n_corpus_heldout", "n_demonstrations", "n_comparisons",
                  "n_comparisons_heldout", "n_ppo_prompts", "n_eval_prompts", "n_labelers")
        _require(self.n_heldout_labelers >= 2, "task.n_heldout_labelers must be >= 2 (agreement needs two)")
        _require(self.label_noise >= 0, "task.label_noise must be >= 0")
        _require(self.labeler_spread >= 0, "task.labeler_spread must be >= 0")


@dataclass
class ModelConfig:
    """The tiny policy built from config: a real LlamaForCausalLM (vLLM's CPU backend needs head_dim 64)."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 64

    def __post_init__(self):
        _positive(self, "model", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions")
        _require(self.hidden_size % self.num_heads == 0,
                 f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")


@dataclass
class TrainedModelConfig:
    """A trained model from a local transformers directory: the `policy` and `value` sections.

    policy.path: the causal LM to start from (SFT starts from it; PPO starts from, and stays close to, it).
    value.path: default the reward model (InstructGPT); any causal LM or scalar-head directory works.
    With the built-in task these stay unset and the tiny model is built from `model`.
    """
    path: Optional[str] = None
    lora_rank: int = 0                  # > 0: train LoRA adapters (peft) instead of every weight
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"    # peft target_modules: "all-linear" or comma-separated module names
    gradient_checkpointing: bool = False

    def __post_init__(self):
        _require(self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}")
        _require(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        _require(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class RewardSourceConfig:
    """Where PPO's rewards come from: the `reward` section.

    path: the reward model (`rm` writes one; for `rm` itself, where its training starts: default the policy).
    fn: a Python function `package.module:function` taking (prompts, responses), two lists of texts, and
    returning one float per response (a verifiable reward: the built-in task's is
    `engine.task.rewards:exact_answer`). Alone it is the reward; with `path` too, the two are summed.
    """
    path: Optional[str] = None
    fn: Optional[str] = None
    # an ensemble's members (`rm --rm.members N`) made one reward: mean, wco (min), uwo (mean - lambda x var)
    ensemble: str = "mean"
    uwo_lambda: float = 1.0

    def __post_init__(self):
        _require(self.fn is None or (":" in self.fn and all(self.fn.split(":", 1))),
                 f"reward.fn must be package.module:function, got {self.fn!r}")
        _require(self.ensemble in ("mean", "wco", "uwo"),
                 f"reward.ensemble must be mean, wco or uwo, got {self.ensemble!r}")
        _require(self.uwo_lambda >= 0 and self.uwo_lambda < float("inf"),
                 f"reward.uwo_lambda must be a finite number >= 0 (the weight of the members' variance), got "
                 f"{self.uwo_lambda}")


@dataclass
class GoldConfig:
    """A gold signal on your own model, which the trained-on reward never saw, measured at PPO's evaluations
    beside the proxy and d = sqrt(KL to the start) (the built-in task's gold: its held-out labelers). path: a
    reward model to judge with; fn: `package.module:function` as --reward.fn. One, with --data.eval_prompts."""
    path: Optional[str] = None
    fn: Optional[str] = None

    def __post_init__(self):
        _require(self.fn is None or (":" in self.fn and all(self.fn.split(":", 1))),
                 f"gold.fn must be package.module:function, got {self.fn!r}")
        _require(self.fn is None or self.path is None,
                 "give one gold: --gold.path (a reward model) or --gold.fn (a function), not both")

    @property
    def given(self) -> bool:
        return self.path is not None or self.fn is not None


@dataclass
class FrozenModelConfig:
    """A frozen model from a local directory: the `reference` and `reward` sections.

    reference.path: default the policy's starting weights (under LoRA: the policy with adapters disabled,
    no second copy). reward.path: the reward model PPO scores with (`rm` writes one); for `rm`, where
    training starts (default: policy.path, the SFT model, as in InstructGPT).
    """
    path: Optional[str] = None


@dataclass
class DataConfig:
    """Users' data files (JSONL, JSON or Parquet; formats in engine/data/formats.py and the README)."""
    prompts: Optional[str] = None           # PPO prompts
    demonstrations: Optional[str] = None    # SFT; also the RM's normalisation (demonstrations score 0)
    comparisons: Optional[str] = None       # RM: pairwise chosen/rejected or K-way ranked
    eval_comparisons: Optional[str] = None  # RM: held-out comparisons -> rm_heldout_accuracy in rm/eval.json
    pretrain: Optional[str] = None          # PPO-ptx's pretraining texts: {"text": ...}
    eval_prompts: Optional[str] = None      # PPO: held-out prompts the gold (--gold.*) judges answers to
    max_prompt_tokens: int = 512
    max_response_tokens: int = 512         # SFT and RM responses longer than this are cut (counted in the log)
    long_prompts: str = "truncate"          # "truncate": keep the last max_prompt_tokens tokens | "drop"

    def __post_init__(self):
        _require(self.long_prompts in ("truncate", "drop"),
                 f"data.long_prompts must be truncate or drop, got {self.long_prompts!r}")
        _require(self.max_prompt_tokens >= 1 and self.max_response_tokens >= 1,
                 "data.max_prompt_tokens and data.max_response_tokens must be >= 1")


@dataclass
class LMTrainConfig:
    """Language-model training: `pretrain` on the corpus, `sft` on demonstrations (loss on responses)."""
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0          # gradients clipped to this norm before each step
    checkpoint_every: int = 200
    log_every: int = 20

    def check(self, section: str) -> None:
        """Validated by Config with the section's name (the class serves both `pretrain` and `sft`)."""
        _positive(self, section, "steps", "batch_size", "checkpoint_every", "log_every")
        _require(self.lr > 0, f"{section}.lr must be > 0, got {self.lr}")
        _require(self.warmup >= 0, f"{section}.warmup must be >= 0, got {self.warmup}")
        _require(self.weight_decay >= 0, f"{section}.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.max_grad_norm > 0, f"{section}.max_grad_norm must be > 0, got {self.max_grad_norm}")


@dataclass
class RewardConfig:
    """Reward model: the SFT body with a scalar head, trained on K-way rankings."""
    steps: int = 300
    batch_size: int = 16                # prompts per batch; each brings its K responses and C(K,2) pairs
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 20
    # an ensemble: N score heads on the one body, each with its own initialisation and trained on its own
    # bootstrap resample of the comparisons (the prompts it drew at least once); saved as one model
    members: int = 1

    def __post_init__(self):
        _positive(self, "rm", "steps", "batch_size", "checkpoint_every", "log_every", "members")
        _require(self.members <= 1024, f"rm.members must be at most 1024, got {self.members}")
        for name in ("lr", "max_grad_norm"):
            _require(getattr(self, name) > 0, f"rm.{name} must be > 0, got {getattr(self, name)}")
        _require(self.warmup >= 0 and self.weight_decay >= 0, "rm.warmup and rm.weight_decay must be >= 0")


@dataclass
class DPOConfig:
    """Direct preference optimisation on the comparisons (no reward model, no rollouts): the `dpo` section.

    Each batch element is one prompt with all its ranked responses (K = 2 for chosen/rejected pairs), all of
    them in one forward; the losses are kernels.preference's."""
    steps: int = 300
    batch_size: int = 16                # prompts per batch; each brings its K responses
    lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "sigmoid"               # sigmoid (DPO, over every ranked pair) | ipo | listwise (Plackett-Luce)
    beta: float = 0.1
    label_smoothing: float = 0.0        # cDPO (sigmoid only): each pair's label flipped with this probability
    length_norm: bool = False           # score a response by its mean token log-prob instead of the sum
    reference_free: bool = False        # no reference model: the policy's log-probs alone (SimPO-style)
    checkpoint_every: int = 100
    log_every: int = 20
    backend: str = "auto"               # kernels backend of the fused LM-head log-probs

    def __post_init__(self):
        from kernels import PREFERENCE_LOSSES

        _positive(self, "dpo", "steps", "batch_size", "checkpoint_every", "log_every")
        _require(self.loss in PREFERENCE_LOSSES, f"dpo.loss must be one of {', '.join(PREFERENCE_LOSSES)}, got "
                 f"{self.loss!r}")
        for name in ("lr", "beta", "max_grad_norm"):
            _require(getattr(self, name) > 0, f"dpo.{name} must be > 0, got {getattr(self, name)}")
        # beta scales log-prob differences of tens of nats: past 100 the loss is a step function of their sign,
        # and 1e30 overflows float32 (grad_norm Infinity); the papers use 0.01-1
        _require(self.beta <= 100, f"dpo.beta must be at most 100 (DPO's papers use 0.01 to 1), got {self.beta}")
        _require(self.warmup >= 0 and self.weight_decay >= 0, "dpo.warmup and dpo.weight_decay must be >= 0")
        _require(0 <= self.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got "
                 f"{self.label_smoothing}")
        _require(self.label_smoothing == 0 or self.loss == "sigmoid", f"dpo.label_smoothing (cDPO) flips a pair's "
                 f"label: it is defined for --dpo.loss sigmoid, not {self.loss}")
        _require(self.backend in ("auto", "torch", "triton", "cuda", "cpu"), f"unknown dpo.backend {self.backend!r}")

    @property
    def stage(self) -> str:
        """The run directory's folder for this loss: dpo, dpo_ipo or dpo_listwise (so one run holds all three)."""
        return "dpo" if self.loss == "sigmoid" else f"dpo_{self.loss}"


@dataclass
class PPOConfig:
    """PPO and the critic-free estimators on the same loop (advantage_estimator, verl's name for the switch)."""
    iterations: int = 250
    rollout_batch: int = 64             # prompts per iteration
    samples_per_prompt: int = 1         # answers sampled per prompt (n: >= 2 for grpo, drgrpo, rloo)
    advantage_estimator: str = "gae"    # gae (with a value model) | grpo | drgrpo | rloo | reinforce_pp
    minibatch: int = 32                 # answers per gradient step
    epochs: int = 2
    lr: float = 1e-4
    value_lr: float = 1e-3
    weight_decay: float = 0.0
    kl_coef: float = 0.1                # beta
    adaptive_kl: bool = False           # Ziegler et al.'s proportional controller
    target_kl: float = 6.0              # per sequence, for the adaptive controller
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    clip_eps: float = 0.2               # the policy ratio is clipped to [1 - clip_eps, 1 + clip_high]
    clip_high: float = 0.0              # 0: clip_eps (DAPO's clip-higher: e.g. 0.28)
    loss_agg: str = "token-mean"        # token-mean (DAPO) | seq-mean-token-mean (GRPO) | seq-mean-token-sum-norm
    kl_loss_coef: float = 0.0           # KL to the reference in the loss, GRPO's way (kl_coef puts it in the reward)
    kl_loss_estimator: str = "k3"
    drop_constant_groups: bool = False  # DAPO's dynamic sampling: groups that all score the same are resampled
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    ptx_coef: float = 1.0               # gamma of PPO-ptx (used when the run is PPO-ptx)
    ptx_batch: int = 32
    max_grad_norm: float = 1.0
    tis_cap: float = 0.0                # truncated importance sampling vs the rollout engine (0 = off; e.g. 2)
    # Asynchronous rollouts: the engine in its own process generates batch t with the policy after t - k
    # updates while the trainer updates (0: the synchronous loop). Such answers are corrected by importance
    # weights to the engine's log-probs (tis: clamped at tis_cap; decoupled: AReaL's, tokens beyond the cap
    # dropped), capped at tis_cap, or 2 when tis_cap is 0.
    max_staleness: int = 0
    off_policy_correction: str = "decoupled"
    log_kl: bool = False                # the KL-to-reference metric even when nothing trains on it (one forward more)
    old_logprobs: str = "auto"          # auto | trainer | engine: where the sampling-time log-probs come from
    eval_every: int = 25                # win rate against SFT over training (0 = off)
    eval_prompts: int = 64
    checkpoint_every: int = 50
    backend: str = "auto"               # kernels backend

    def __post_init__(self):
        from kernels import ESTIMATORS
        from kernels.losses import LOSS_AGGS

        for name in ("kl_estimator", "kl_loss_estimator"):
            _require(getattr(self, name) in ("k1", "k2", "k3"), f"ppo.{name} must be k1, k2 or k3, got "
                     f"{getattr(self, name)!r}")
        _require(self.advantage_estimator in ESTIMATORS, f"ppo.advantage_estimator must be one of "
                 f"{', '.join(ESTIMATORS)}, got {self.advantage_estimator!r}")
        _require(self.loss_agg in LOSS_AGGS, f"ppo.loss_agg must be one of {', '.join(LOSS_AGGS)}, got "
                 f"{self.loss_agg!r}")
        _positive(self, "ppo", "iterations", "rollout_batch", "samples_per_prompt", "minibatch", "epochs",
                  "ptx_batch", "eval_prompts", "checkpoint_every", "kl_horizon")
        _require(self.samples_per_prompt >= 2 or self.advantage_estimator in ("gae", "reinforce_pp"),
                 f"ppo.advantage_estimator {self.advantage_estimator} compares each answer with the other answers to "
                 f"its prompt: set ppo.samples_per_prompt >= 2 (got {self.samples_per_prompt})")
        _require(self.samples_per_prompt >= 2 or not self.drop_constant_groups,
                 "ppo.drop_constant_groups needs groups: set ppo.samples_per_prompt >= 2")
        for name in ("lr", "value_lr", "target_kl", "clip_eps", "value_clip_eps", "max_grad_norm"):
            _require(getattr(self, name) > 0, f"ppo.{name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_coef", "vf_coef", "ptx_coef", "eval_every", "weight_decay", "clip_high", "kl_loss_coef"):
            _require(getattr(self, name) >= 0, f"ppo.{name} must be >= 0, got {getattr(self, name)}")
        answers = self.rollout_batch * self.samples_per_prompt
        _require(answers % self.minibatch == 0, f"ppo.rollout_batch x ppo.samples_per_prompt ({answers} answers) must "
                 f"be a multiple of ppo.minibatch ({self.minibatch})")
        _require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
        _require(self.tis_cap == 0 or self.tis_cap >= 1, f"ppo.tis_cap must be 0 (off) or >= 1, got {self.tis_cap}")
        _require(self.max_staleness >= 0, f"ppo.max_staleness must be >= 0 (0: synchronous), got {self.max_staleness}")
        _require(self.max_staleness <= 16, f"ppo.max_staleness must be at most 16, got {self.max_staleness}: every "
                 f"version in flight keeps a copy of the policy's weights in shared memory (1000 ran out of file "
                 f"descriptors), and the overlap pays at 1-4")
        _require(self.off_policy_correction in ("tis", "decoupled"), f"ppo.off_policy_correction must be tis or "
                 f"decoupled, got {self.off_policy_correction!r}")
        _require(self.backend in ("auto", "torch", "triton", "cuda", "cpu"), f"unknown ppo.backend {self.backend!r}")
        _require(self.old_logprobs in ("auto", "trainer", "engine"), f"ppo.old_logprobs must be auto, trainer or "
                 f"engine, got {self.old_logprobs!r}")


@dataclass
class RolloutConfig:
    backend: str = "hf"                 # "hf" (transformers generate) | "vllm" | "auto" (vLLM if it imports)
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    gpu_memory_utilization: float = 0.3  # vLLM colocated on a GPU: its share of the memory, and whether it sleeps
    sleep: bool = False                   # (weights and KV cache freed) while the trainer runs
    # vLLM on the CPU: its oneDNN-packed layers (decoding 1.5-1.8x faster at 58M-630M parameters here, but each
    # sync repacks them: 10-13x the copy floor) or the plain layout synced in place (within 1.2x of the floor)
    cpu_packed_gemm: bool = False
    # vLLM tensor parallelism across the trainer's own processes (torchrun; vLLM's external_launcher): a group of
    # tensor_parallel ranks runs one engine, each rank 1/tensor_parallel of the weights. 1: an engine per process.
    tensor_parallel: int = 1
    # --ppo.max_staleness > 0: the engine process's CPUs: follow (the trainer takes them while the engine idles:
    # 1.13-1.15x the synchronous loop at 25.8M, bench/results/cpu-2core/async-cores.md; not bit-exact across
    # 1 and 2 threads), shared (bit-exact, 0.91-1.01x) or split (the CPUs halved and pinned: bit-exact, 0.79x).
    engine_cores: str = "follow"
    # Episodes (engine/episodes): several turns with an environment (package.module:Class) and/or tools (functions
    # package.module:a,b, shown to the model in every prompt and run by engine.episodes.tools unless env is given)
    env: str | None = None
    tools: str | None = None
    max_turns: int = 4                  # the model's turns per episode
    max_episode_tokens: int = 0         # all tokens after the prompt, both sides' (0: max_turns x max_new_tokens)
    max_env_tokens: int = 64            # per environment message (longer ones are cut)
    env_timeout: float = 10.0           # seconds per call into the environment

    def __post_init__(self):
        _positive(self, "rollout", "max_turns", "max_env_tokens", "max_new_tokens")
        _require(self.env_timeout > 0 <= self.max_episode_tokens, "rollout.env_timeout must be > 0, max_episode_tokens >= 0")
        _require(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization must be in (0, 1]")
        _require(self.tensor_parallel >= 1, f"rollout.tensor_parallel must be >= 1, got {self.tensor_parallel}")
        _require(self.engine_cores in ("split", "shared", "follow"), f"rollout.engine_cores must be split, shared or "
                 f"follow, got {self.engine_cores!r}")
        _require(self.tensor_parallel == 1 or self.backend == "vllm",
                 f"rollout.tensor_parallel {self.tensor_parallel} needs --rollout.backend vllm (the hf backend "
                 f"samples from the sharded policy itself)")
        _require(self.backend in ("hf", "vllm", "auto"), f"rollout.backend must be hf, vllm or auto, got "
                 f"{self.backend!r}")
        _require(self.temperature > 0, "rollout.temperature must be > 0")
        _require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _require(self.top_k == -1 or self.top_k >= 1, f"rollout.top_k must be -1 (off) or >= 1, got {self.top_k}")


@dataclass
class EvalConfig:
    temperature: float = 1.0            # both policies are sampled the same way
    seed: int = 1234

    def __post_init__(self):
        _require(self.temperature > 0, f"eval.temperature must be > 0, got {self.temperature}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: LMTrainConfig = field(default_factory=LMTrainConfig)
    sft: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(steps=500, lr=1e-3, warmup=20))
    rm: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    policy: TrainedModelConfig = field(default_factory=TrainedModelConfig)
    reference: FrozenModelConfig = field(default_factory=FrozenModelConfig)
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    value: TrainedModelConfig = field(default_factory=TrainedModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gold: GoldConfig = field(default_factory=GoldConfig)

    def __post_init__(self):
        self.pretrain.check("pretrain")
        self.sft.check("sft")

    @property
    def local(self) -> bool:
        """True when the run trains the user's checkpoint (`policy.path`) instead of the built-in task."""
        return self.policy.path is not None
